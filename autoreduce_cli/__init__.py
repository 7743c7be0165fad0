"""The operator's tools, outside the daemon: the ``autoreduce`` command line
(``cli``, its pure views in ``status``) and the chart's ``helm test`` canary
(``canary``).

They use the dispatcher's pure modules (settings, names, labels, manifests, failure
reports) and its one API boundary, ``dispatcher.kube``; the dispatcher never imports
this package (an import-linter contract in pyproject.toml). Their API rights are the
chart's operator Role (``helm/autoreduce/templates/rbac.yaml``), not the daemon's.
"""
