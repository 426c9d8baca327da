"""virtio devices (virtio 1.2): the split virtqueue (queue), the virtio-mmio
transport (mmio), and the block and network front-ends (blk, net)."""
