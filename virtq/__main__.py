import sys

from virtq.cli import main

sys.exit(main())
