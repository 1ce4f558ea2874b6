"""PTQ Studio's Qt front end: views and workers that draw what core.session.Session returns."""
