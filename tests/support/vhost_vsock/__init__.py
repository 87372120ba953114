"""A fake QEMU and guest virtio-vsock driver for the vhost-user-vsock device's tests."""
