from ternqc.cli import main

raise SystemExit(main())
