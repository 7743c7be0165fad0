"""A node agent that stands in for the kubelet in tests.

It registers a Node, binds pending pods it fits (there is no scheduler), runs each
container's command as a local process inside a private mount and PID namespace with
the pod's volumes bind-mounted at their mount paths, reports status like the kubelet,
and serves ``/containerLogs`` over HTTPS so ``kubectl logs`` works through the real
apiserver. See ``README.md`` next to this file for what is and is not supported.
"""
