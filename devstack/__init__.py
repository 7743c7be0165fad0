"""The local stack as product code: image builds with a real engine, and real nodes
(containerd + kubelet) for the local control plane. See devstack/README.md."""
