"""`python -m jaxllm`: the same as the `jaxllm` command."""

import sys

from jaxllm.cli import main

sys.exit(main())
