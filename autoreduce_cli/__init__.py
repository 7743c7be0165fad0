"""The operator's tools, outside the daemon: the ``autoreduce`` command line and the
chart's ``helm test`` canary (``canary``).

The command line: ``cli`` (entry point, settings, clients, every API call), ``args``
(the parser), one ``cmd_*`` module per command, and what they share: ``errors`` (exit
codes), ``queues`` (browsing the broker), ``follow`` (sending a run and following
it). Its pure views: ``rows`` (a Job as a row), ``status`` (the status summary and
its text and JSON), ``dead_letter``, ``runs`` (which run a file or message is
about) and ``tables`` (ages and columns).

They use the dispatcher's pure modules (settings, names, labels, manifests, failure
reports) and its one API boundary, ``dispatcher.kube``; the dispatcher never imports
this package (an import-linter contract in pyproject.toml). Their API rights are the
chart's operator Role (``helm/autoreduce/templates/rbac.yaml``), not the daemon's.
"""
