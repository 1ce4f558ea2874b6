"""`python -m ptq_studio`: the same as the `ptq-studio` console script."""

import sys

from ptq_studio.launcher import main

sys.exit(main())
