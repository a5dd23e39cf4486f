from neuromf.cli import main

raise SystemExit(main())
