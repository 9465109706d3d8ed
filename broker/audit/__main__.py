"""``python -m broker.audit``: the audit writer process (the broker starts it; see ``broker.audit.writer``)."""

from broker.audit.writer import main

raise SystemExit(main())
