/* virtio_blk.c -- virtio-blk (virtio 1.2 §5.2) over virtio-mmio, every request
 * type, reporting PASS/FAIL over serial (guests/README.md).
 *
 * Boot with one virtio-blk drive whose sector s holds bytes (s + j) & 0xff
 * (j = byte index in the sector), and a command line naming the mode:
 *   mode=rw cap=N      read, write + read back, flush, GET_ID, past-end IOERR,
 *                      unaligned IOERR, discard, write-zeroes + read back,
 *                      unknown type UNSUPP, indirect read, interrupt status
 *   mode=ro cap=N      VIRTIO_BLK_F_RO offered; OUT and WRITE_ZEROES get IOERR;
 *                      reads and FLUSH succeed
 *   mode=durable n=N   writes sector k (k = 1..N, sector k % cap) filled with
 *                      k, FLUSHes, prints "ACK k" after the flush completed
 *   mode=bench kind=seq|rand count=N size=B depth=D
 *                      N reads of B bytes with D requests in flight, then DONE
 * Written sectors (mode=rw): 2 = 0xa5 pattern, 6-7 = zeroes. */
#include "c/virtio.h"

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2
#define BLK_F_SEG_MAX 2
#define BLK_F_RO 5
#define BLK_F_BLK_SIZE 6
#define BLK_F_FLUSH 9
#define BLK_F_DISCARD 13
#define BLK_F_WRITE_ZEROES 14

#define QAREA 0x400000u
#define HDRS 0x420000u        /* 16-byte headers, one per slot */
#define STATS 0x428000u       /* status bytes, one per slot */
#define DATA 0x500000u        /* data buffers */
#define ITABLE 0x430000u

struct req_hdr { u32 type; u32 reserved; u64 sector; };
static struct vq q;
static u32 base;
static int ack_irq;           /* acknowledge the interrupt after each request */

/* One request, synchronously: header, optional data, status.  Returns the
 * status byte; *used gets the used length. */
static u32 blk_req(u32 type, u64 sector, u32 data, u32 len, int dev_writes, u32 *used, int indirect) {
    struct req_hdr *h = (struct req_hdr *)HDRS;
    volatile u8 *st = (volatile u8 *)STATS;
    h->type = type; h->reserved = 0; h->sector = sector;
    *st = 0xee;
    struct buf b[3];
    int n = 0;
    b[n].addr = HDRS; b[n].len = 16; b[n++].writable = 0;
    if (len) { b[n].addr = data; b[n].len = len; b[n++].writable = dev_writes; }
    b[n].addr = STATS; b[n].len = 1; b[n++].writable = 1;
    u16 head = indirect ? vq_add_indirect(&q, (struct vdesc *)ITABLE, b, n) : vq_add(&q, b, n);
    vq_publish(&q, head);
    vq_kick(&q);
    u32 id = 0xffff, l = 0;
    for (int spin = 0; !vq_used(&q, &id, &l); spin++)
        if (spin > 1000000) { puts("FAIL: request never completed\n"); done(); }
    if (id != head) { puts("FAIL: used id "); puthex(id); puts(" != head\n"); guest_fails++; }
    if (ack_irq) mmio_write(base + VM_INTERRUPT_ACK, mmio_read(base + VM_INTERRUPT_STATUS));
    if (used) *used = l;
    return *st;
}

static int pattern_ok(u32 addr, u32 sector, u32 nsect) {
    const u8 *p = (const u8 *)addr;
    for (u32 s = 0; s < nsect; s++)
        for (u32 j = 0; j < 512; j++)
            if (p[s * 512 + j] != (u8)(sector + s + j)) return 0;
    return 1;
}

static void test_rw(u32 cap, u64 feats) {
    u32 used;
    memset((void *)DATA, 0, 0x10000);
    check_eq(blk_req(T_IN, 0, DATA, 1024, 1, &used, 0), S_OK, "read sectors 0-1: status OK");
    check_eq(used, 1025, "read: used length = data + status");
    check(pattern_ok(DATA, 0, 2), "read: bytes are the image's");
    check_eq(mmio_read(base + VM_INTERRUPT_STATUS) & 1, 1, "InterruptStatus: used buffer bit set");
    mmio_write(base + VM_INTERRUPT_ACK, 1);
    check_eq(mmio_read(base + VM_INTERRUPT_STATUS), 0, "InterruptACK clears it");

    memset((void *)DATA, 0xa5, 512);
    check_eq(blk_req(T_OUT, 2, DATA, 512, 0, &used, 0), S_OK, "write sector 2: status OK");
    check_eq(used, 1, "write: used length = status byte");
    memset((void *)DATA, 0, 512);
    check_eq(blk_req(T_IN, 2, DATA, 512, 1, 0, 0), S_OK, "read back sector 2");
    u8 want[512];
    memset(want, 0xa5, 512);
    check(memeq((void *)DATA, want, 512), "read back: the written bytes");
    check_eq((u32)(feats >> BLK_F_FLUSH) & 1, 1, "VIRTIO_BLK_F_FLUSH offered");
    check_eq(blk_req(T_FLUSH, 0, 0, 0, 0, 0, 0), S_OK, "flush: status OK");

    check_eq(blk_req(T_IN, cap, DATA, 512, 1, 0, 0), S_IOERR, "read at capacity: IOERR");
    check_eq(blk_req(T_IN, cap - 1, DATA, 1024, 1, 0, 0), S_IOERR, "read across the end: IOERR");
    check_eq(blk_req(T_OUT, cap, DATA, 512, 0, 0, 0), S_IOERR, "write past the end: IOERR");
    check_eq(blk_req(T_IN, 0, DATA, 100, 1, 0, 0), S_IOERR, "read of 100 bytes (not 512n): IOERR");

    memset((void *)DATA, 0, 32);
    check_eq(blk_req(T_GET_ID, 0, DATA, 20, 1, &used, 0), S_OK, "GET_ID: status OK");
    check_eq(used, 21, "GET_ID: 20 bytes + status");
    puts("INFO: id="); puts((const char *)DATA); putc('\n');

    u32 *seg = (u32 *)DATA;
    seg[0] = 4; seg[1] = 0; seg[2] = 2; seg[3] = 0;          /* sector 4, 2 sectors, no flags */
    check_eq(blk_req(T_DISCARD, 0, DATA, 16, 0, 0, 0), S_OK, "discard sectors 4-5: OK");
    seg[3] = 1;                                                /* unmap flag */
    check_eq(blk_req(T_DISCARD, 0, DATA, 16, 0, 0, 0), S_UNSUPP, "discard with unmap flag: UNSUPP");
    seg[0] = 6; seg[1] = 0; seg[2] = 2; seg[3] = 0;
    check_eq(blk_req(T_WRITE_ZEROES, 0, DATA, 16, 0, 0, 0), S_OK, "write zeroes sectors 6-7: OK");
    memset((void *)(DATA + 0x1000), 0x77, 1024);
    check_eq(blk_req(T_IN, 6, DATA + 0x1000, 1024, 1, 0, 0), S_OK, "read back sectors 6-7");
    u8 z[1024];
    memset(z, 0, 1024);
    check(memeq((void *)(DATA + 0x1000), z, 1024), "write zeroes: sectors read as zeroes");
    seg[0] = cap; seg[2] = 1;
    check_eq(blk_req(T_WRITE_ZEROES, 0, DATA, 16, 0, 0, 0), S_IOERR, "write zeroes past the end: IOERR");

    check_eq(blk_req(99, 0, 0, 0, 0, 0, 0), S_UNSUPP, "unknown request type: UNSUPP");

    memset((void *)DATA, 0, 2048);
    check_eq(blk_req(T_IN, 8, DATA, 2048, 1, &used, 1), S_OK, "indirect read of sectors 8-11: OK");
    check(pattern_ok(DATA, 8, 4), "indirect read: the image's bytes");
}

static void test_ro(u64 feats) {
    check_eq((u32)(feats >> BLK_F_RO) & 1, 1, "VIRTIO_BLK_F_RO offered");
    memset((void *)DATA, 0x33, 512);
    check_eq(blk_req(T_OUT, 1, DATA, 512, 0, 0, 0), S_IOERR, "write to a read-only disk: IOERR");
    u32 *seg = (u32 *)DATA;
    seg[0] = 1; seg[1] = 0; seg[2] = 1; seg[3] = 0;
    check_eq(blk_req(T_WRITE_ZEROES, 0, DATA, 16, 0, 0, 0), S_IOERR, "write zeroes to a read-only disk: IOERR");
    check_eq(blk_req(T_IN, 1, DATA, 512, 1, 0, 0), S_OK, "read from a read-only disk: OK");
    check(pattern_ok(DATA, 1, 1), "read-only disk: sector 1 unchanged");
    check_eq(blk_req(T_FLUSH, 0, 0, 0, 0, 0, 0), S_OK, "flush on a read-only disk: OK");
}

static void durable(u32 cap, u32 n) {
    for (u32 k = 1; k <= n; k++) {
        u32 *d = (u32 *)DATA;
        for (int i = 0; i < 128; i++) d[i] = k;
        if (blk_req(T_OUT, k % cap, DATA, 512, 0, 0, 0) != S_OK) { puts("FAIL: write\n"); done(); }
        if (blk_req(T_FLUSH, 0, 0, 0, 0, 0, 0) != S_OK) { puts("FAIL: flush\n"); done(); }
        puts("ACK "); putdec(k); putc('\n');
    }
}

/* N reads of `size` bytes, `depth` in flight: requests go out in batches of
 * `depth` with one notify, completions are reaped by polling the used ring. */
static void bench(u32 cap, int rand, u32 count, u32 size, u32 depth) {
    u32 nsect = size / 512, seed = 12345, next_seq = 0, done_n = 0, issued = 0;
    if (depth > QSIZE / 3) depth = QSIZE / 3;
    while (done_n < count) {
        u32 batch = 0;
        while (batch < depth && issued < count) {
            u32 slot = batch;
            struct req_hdr *h = (struct req_hdr *)(HDRS + 16 * slot);
            u32 sector;
            if (rand) { seed = seed * 1103515245u + 12345u; sector = ((seed >> 8) % (cap / nsect)) * nsect; }
            else { sector = next_seq; next_seq += nsect; if (next_seq + nsect > cap) next_seq = 0; }
            h->type = T_IN; h->reserved = 0; h->sector = sector;
            struct buf b[3] = {{HDRS + 16 * slot, 16, 0}, {DATA + size * slot, size, 1}, {STATS + slot, 1, 1}};
            vq_publish(&q, vq_add(&q, b, 3));
            issued++; batch++;
        }
        vq_kick(&q);
        /* Wait for the whole batch: vmlab completes it during the notify,
         * QEMU in its own time (the descriptors are reused next round). */
        u32 id, l, got = 0;
        for (u32 spin = 0; got < batch; )
            if (vq_used(&q, &id, &l)) got++, spin = 0;
            else if (++spin > 100000000u) { puts("FAIL: bench requests never completed\n"); done(); }
            else __asm__ volatile("pause");
        done_n += got;
        for (u32 k = 0; k < batch; k++)
            if (*(volatile u8 *)(STATS + k) != S_OK) { puts("FAIL: bench status\n"); done(); }
        mmio_write(base + VM_INTERRUPT_ACK, 3);
    }
    puts("INFO: bench requests="); putdec(done_n); putc('\n');
}

void guest_main(u32 magic, u32 mbinfo) {
    serial_init();
    const char *cl = cmdline(mbinfo);
    check_eq(magic, 0x2badb002u, "booted by a Multiboot loader");
    virtio_cmdline = cl;
    base = virtio_find(2, 0);
    if (!base) { puts("FAIL: no virtio-blk device\n"); guest_fails++; done(); }
    check_eq(mmio_read(base + VM_VERSION), 2, "virtio-mmio Version = 2");
    u64 feats = virtio_device_features(base);
    check_eq((u32)(feats >> F_VERSION_1) & 1, 1, "VIRTIO_F_VERSION_1 offered");
    u32 st = virtio_negotiate(base, 0);
    /* §6.1: a device "MAY fail to operate further if VIRTIO_F_VERSION_1 is not
     * accepted"; vmlab's refuses (it has no legacy interface), QEMU's accepts. */
    if (mmio_read(base + VM_VENDOR_ID) == VMLAB_VENDOR)
        check_eq(st & S_FEATURES_OK, 0, "features without VERSION_1: FEATURES_OK refused");
    else { puts("INFO: FEATURES_OK without VERSION_1: "); puthex(st & S_FEATURES_OK); putc('\n'); }
    u64 want = (1ull << F_VERSION_1) | (1ull << F_INDIRECT_DESC) | (1ull << BLK_F_FLUSH) | (1ull << BLK_F_BLK_SIZE)
             | (1ull << BLK_F_SEG_MAX) | (1ull << BLK_F_DISCARD) | (1ull << BLK_F_WRITE_ZEROES);
    want |= feats & (1ull << BLK_F_RO);
    st = virtio_negotiate(base, want);
    check_eq(st & S_FEATURES_OK, S_FEATURES_OK, "FEATURES_OK accepted");
    if (!virtio_queue(&q, base, 0, QAREA)) { puts("FAIL: queue 0 too small\n"); guest_fails++; done(); }
    virtio_driver_ok(base);
    check_eq(mmio_read(base + VM_STATUS), 15, "Status = ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK");
    u32 cap = mmio_read(base + VM_CONFIG);
    check_eq(cap, cmd_num(cl, "cap", cap), "capacity in sectors");
    check_eq(mmio_read(base + VM_CONFIG + 20), 512, "blk_size = 512");
    if (cmd_has(cl, "mode=ro")) test_ro(feats);
    else if (cmd_has(cl, "mode=durable")) ack_irq = 1, durable(cap, cmd_num(cl, "n", 1000000));
    else if (cmd_has(cl, "mode=bench"))
        bench(cap, cmd_has(cl, "kind=rand"), cmd_num(cl, "count", 1000), cmd_num(cl, "size", 4096),
              cmd_num(cl, "depth", 32));
    else test_rw(cap, feats);
    check_eq(mmio_read(base + VM_STATUS) & S_NEEDS_RESET, 0, "device never needed a reset");
    done();
}
