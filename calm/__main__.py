from calm.cli import main

raise SystemExit(main())
