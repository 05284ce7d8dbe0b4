import sys

from fedhq_kernels.profile.cli import main

sys.exit(main())
