"""Back-ends of the virtio devices: where a block device's data lives (raw
file, read-only, copy-on-write overlay) and where a network device's frames go
(in-process hub, UDP socket, pcap capture).  Front-ends in devices/virtio talk
to them through small protocols (devices.backends.block.BlockBackend,
devices.backends.net.NetBackend)."""
