"""Who may do what on a coordinator: device enrollment and signed check-ins
(:mod:`.devices`), admin credentials and roles (:mod:`.admin`), abuse limits
(:mod:`.limits`) and the audit log (:mod:`.audit`). Plain Python over a
:class:`~coordinator.storage.SecurityStore`; the transport calls it and maps its errors."""
