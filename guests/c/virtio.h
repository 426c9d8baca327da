/* A small virtio-mmio (virtio 1.2 §4.2.2, version 2) split-queue driver for
 * vmlab's C test guests; polled, one chain per request. */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "guest.h"

#define VIRTIO_MMIO_BASE 0xd0000000u
#define VIRTIO_MMIO_SLOTS 9
/* QEMU's microvm machine: 8 virtio-mmio transports of 512 bytes from
 * 0xfeb00000 (24 with its second I/O APIC), transport k on GSI 5 + k without
 * that I/O APIC (hw/i386/microvm.h VIRTIO_MMIO_BASE,
 * VIRTIO_NUM_TRANSPORTS, VIRTIO_IRQ_BASE); its auto-kernel-cmdline entries
 * only reach Linux kernels, so a Multiboot guest probes them. */
#define QEMU_MICROVM_BASE 0xfeb00000u
#define QEMU_MICROVM_SLOTS 24
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_VENDOR_ID 0x00c
#define VMLAB_VENDOR 0x4c4d5656u   /* vmlab's VendorID, "VVML" (devices/virtio/mmio.py VENDOR) */
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

/* The kernel command line, when the guest has one: devices declared there
 * as virtio_mmio.device=SIZE@ADDR:IRQ (what vmlab, Firecracker and QEMU's
 * microvm with auto-kernel-cmdline=on put on a Linux command line) are
 * probed before vmlab's slots. */
static const char *virtio_cmdline = "";

/* The n-th virtio_mmio.device= entry: its base (and *irq), or 0 if none. */
static u32 virtio_cmdline_device(int n, u32 *irq) {
    static const char key[] = "virtio_mmio.device=";
    for (const char *p = virtio_cmdline; *p; p++) {
        if (p != virtio_cmdline && p[-1] != ' ') continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (*k) continue;
        while (*q && *q != '@' && *q != ' ') q++;           /* SIZE (512, 4K, ...) */
        if (*q != '@' || q[1] != '0' || (q[2] != 'x' && q[2] != 'X')) continue;
        u32 addr = 0, v = 0;
        for (q += 3; ; q++) {
            u32 d = (*q >= '0' && *q <= '9') ? (u32)(*q - '0') : (*q >= 'a' && *q <= 'f') ? (u32)(*q - 'a' + 10)
                  : (*q >= 'A' && *q <= 'F') ? (u32)(*q - 'A' + 10) : 16u;
            if (d == 16) break;
            addr = addr * 16 + d;
        }
        if (*q == ':') for (q++; *q >= '0' && *q <= '9'; q++) v = v * 10 + (u32)(*q - '0');
        if (n-- == 0) { if (irq) *irq = v; return addr; }
    }
    return 0;
}

static int virtio_is(u32 b, u32 device_id) {
    return mmio_read(b + VM_MAGIC) == 0x74726976u && mmio_read(b + VM_DEVICE_ID) == device_id;
}

/* Find the n-th (0-based) device with this Device ID; 0 if none. */
static u32 virtio_find(u32 device_id, int nth) {
    u32 b;
    for (int k = 0; (b = virtio_cmdline_device(k, 0)) != 0; k++)
        if (virtio_is(b, device_id) && nth-- == 0) return b;
    for (int k = 0; k < VIRTIO_MMIO_SLOTS; k++) {
        b = VIRTIO_MMIO_BASE + 0x1000u * (u32)k;
        if (virtio_is(b, device_id) && nth-- == 0)
            return b;
    }
    for (int k = 0; k < QEMU_MICROVM_SLOTS; k++) {
        b = QEMU_MICROVM_BASE + 0x200u * (u32)k;
        if (virtio_is(b, device_id) && nth-- == 0)
            return b;
    }
    return 0;
}

/* The interrupt line of the device at `b`: from its command-line entry, else
 * vmlab's slot layout (devices/virtio/mmio.py IRQS). */
static u32 virtio_irq(u32 b) {
    static const u8 irqs_of_slot[VIRTIO_MMIO_SLOTS] = {5, 6, 7, 9, 10, 11, 12, 14, 15};
    u32 irq, a;
    for (int k = 0; (a = virtio_cmdline_device(k, &irq)) != 0; k++)
        if (a == b) return irq;
    if (b >= QEMU_MICROVM_BASE && b < QEMU_MICROVM_BASE + 0x200u * QEMU_MICROVM_SLOTS)
        return 5 + (b - QEMU_MICROVM_BASE) / 0x200u;
    return irqs_of_slot[((b - VIRTIO_MMIO_BASE) / 0x1000u) % VIRTIO_MMIO_SLOTS];
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
