from apd_cli import main

raise SystemExit(main())
