"""``python -m lesionserve_client``: see cli.py."""
from .cli import main

raise SystemExit(main())
