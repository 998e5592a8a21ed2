from lesionserve.cli import main

raise SystemExit(main())
