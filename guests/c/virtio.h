/* A small virtio-mmio (virtio 1.2 §4.2.2, version 2) split-queue driver for
 * vmlab's C test guests; polled, one chain per request. */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "guest.h"

#define VIRTIO_MMIO_BASE 0xd0000000u
#define VIRTIO_MMIO_SLOTS 9
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_DEVICE_FEATURES 0x010
#define VM_DEVICE_FEATURES_SEL 0x014
#define VM_DRIVER_FEATURES 0x020
#define VM_DRIVER_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INTERRUPT_STATUS 0x060
#define VM_INTERRUPT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC_LOW 0x080
#define VM_QUEUE_DESC_HIGH 0x084
#define VM_QUEUE_DRIVER_LOW 0x090
#define VM_QUEUE_DRIVER_HIGH 0x094
#define VM_QUEUE_DEVICE_LOW 0x0a0
#define VM_QUEUE_DEVICE_HIGH 0x0a4
#define VM_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 64

#define F_INDIRECT_DESC 28
#define F_EVENT_IDX 29
#define F_VERSION_1 32

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4

#define QSIZE 128

struct vdesc { u64 addr; u32 len; u16 flags; u16 next; };
struct vavail { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; };
struct vused_elem { u32 id; u32 len; };
struct vused { u16 flags; u16 idx; struct vused_elem ring[QSIZE]; u16 avail_event; };

struct vq {
    u32 base;
    u32 index;
    struct vdesc *desc;
    struct vavail *avail;
    volatile struct vused *used;
    u16 next_desc;     /* next free descriptor (chains are laid out round-robin) */
    u16 avail_idx;
    u16 used_seen;
};

/* Find the n-th (0-based) device with this Device ID; 0 if none. */
static u32 virtio_find(u32 device_id, int nth) {
    for (int k = 0; k < VIRTIO_MMIO_SLOTS; k++) {
        u32 b = VIRTIO_MMIO_BASE + 0x1000u * (u32)k;
        if (mmio_read(b + VM_MAGIC) == 0x74726976u && mmio_read(b + VM_DEVICE_ID) == device_id && nth-- == 0)
            return b;
    }
    return 0;
}

static u64 virtio_device_features(u32 b) {
    mmio_write(b + VM_DEVICE_FEATURES_SEL, 0);
    u32 lo = mmio_read(b + VM_DEVICE_FEATURES);
    mmio_write(b + VM_DEVICE_FEATURES_SEL, 1);
    return ((u64)mmio_read(b + VM_DEVICE_FEATURES) << 32) | lo;
}

/* §3.1.1 steps 1-6; returns Status (FEATURES_OK set when accepted). */
static u32 virtio_negotiate(u32 b, u64 features) {
    mmio_write(b + VM_STATUS, 0);
    mmio_write(b + VM_STATUS, S_ACKNOWLEDGE);
    mmio_write(b + VM_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio_write(b + VM_DRIVER_FEATURES_SEL, 0);
    mmio_write(b + VM_DRIVER_FEATURES, (u32)features);
    mmio_write(b + VM_DRIVER_FEATURES_SEL, 1);
    mmio_write(b + VM_DRIVER_FEATURES, (u32)(features >> 32));
    mmio_write(b + VM_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    return mmio_read(b + VM_STATUS);
}

/* Queue `index` over the memory at `area` (16 KiB, 4 KiB aligned, zeroed). */
static int virtio_queue(struct vq *q, u32 b, u32 index, u32 area) {
    q->base = b; q->index = index;
    q->desc = (struct vdesc *)area;
    q->avail = (struct vavail *)(area + 0x1000);
    q->used = (volatile struct vused *)(area + 0x2000);
    q->next_desc = q->avail_idx = q->used_seen = 0;
    memset((void *)area, 0, 0x3000);
    mmio_write(b + VM_QUEUE_SEL, index);
    if (mmio_read(b + VM_QUEUE_NUM_MAX) < QSIZE) return 0;
    mmio_write(b + VM_QUEUE_NUM, QSIZE);
    mmio_write(b + VM_QUEUE_DESC_LOW, area);
    mmio_write(b + VM_QUEUE_DESC_HIGH, 0);
    mmio_write(b + VM_QUEUE_DRIVER_LOW, area + 0x1000);
    mmio_write(b + VM_QUEUE_DRIVER_HIGH, 0);
    mmio_write(b + VM_QUEUE_DEVICE_LOW, area + 0x2000);
    mmio_write(b + VM_QUEUE_DEVICE_HIGH, 0);
    mmio_write(b + VM_QUEUE_READY, 1);
    return 1;
}

static void virtio_driver_ok(u32 b) {
    mmio_write(b + VM_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

struct buf { u32 addr; u32 len; int writable; };

/* Put a chain in the descriptor table (not yet published); returns its head. */
static u16 vq_add(struct vq *q, const struct buf *bufs, int n) {
    u16 head = q->next_desc;
    for (int i = 0; i < n; i++) {
        u16 d = (u16)((head + i) % QSIZE);
        q->desc[d].addr = bufs[i].addr;
        q->desc[d].len = bufs[i].len;
        q->desc[d].flags = (u16)((bufs[i].writable ? DESC_F_WRITE : 0) | (i + 1 < n ? DESC_F_NEXT : 0));
        q->desc[d].next = (u16)((d + 1) % QSIZE);
    }
    q->next_desc = (u16)((head + n) % QSIZE);
    return head;
}

/* A chain of one descriptor pointing at an indirect table in `table`. */
static u16 vq_add_indirect(struct vq *q, struct vdesc *table, const struct buf *bufs, int n) {
    for (int i = 0; i < n; i++) {
        table[i].addr = bufs[i].addr;
        table[i].len = bufs[i].len;
        table[i].flags = (u16)((bufs[i].writable ? DESC_F_WRITE : 0) | (i + 1 < n ? DESC_F_NEXT : 0));
        table[i].next = (u16)(i + 1);
    }
    u16 head = q->next_desc;
    q->desc[head].addr = (u32)table;
    q->desc[head].len = (u32)(16 * n);
    q->desc[head].flags = DESC_F_INDIRECT;
    q->next_desc = (u16)((head + 1) % QSIZE);
    return head;
}

static void vq_publish(struct vq *q, u16 head) {
    q->avail->ring[q->avail_idx % QSIZE] = head;
    barrier();
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
    barrier();
}

static void vq_kick(struct vq *q) { mmio_write(q->base + VM_QUEUE_NOTIFY, q->index); }

/* Next used element, or 0 when none (polling). */
static int vq_used(struct vq *q, u32 *id, u32 *len) {
    barrier();
    if (q->used->idx == q->used_seen) return 0;
    const volatile struct vused_elem *e = &q->used->ring[q->used_seen % QSIZE];
    *id = e->id; *len = e->len;
    q->used_seen++;
    return 1;
}
#endif
