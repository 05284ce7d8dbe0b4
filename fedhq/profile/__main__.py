import sys

from fedhq.profile.cli import main

sys.exit(main())
