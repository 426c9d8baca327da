/* virtio_net.c -- virtio-net (virtio 1.2 §5.1) over virtio-mmio: two of these
 * guests ping-pong Ethernet frames and report PASS/FAIL over serial
 * (guests/README.md).
 *
 * Command line:
 *   mode=ping count=N size=B [depth=D] [wait=hlt|poll] [bench]
 *       sends N frames of B bytes (60..1514), D at a time (default 1), and
 *       checks every echo (sequence number, length, payload; not in bench)
 *   mode=pong count=N [wait=hlt|poll] [bench]
 *       echoes every frame back with the MAC addresses swapped until it has
 *       echoed sequence number N-1
 *   wait=hlt   sleep in HLT until the device's interrupt (8259, IRQ of the
 *              slot), the default; wait=poll spins on the used ring and, as
 *              ping, sends a frame again when no echo came (for peers in other
 *              processes, which may not be listening yet).
 * Frames: destination ff:ff:ff:ff:ff:ff, source = the device's MAC, EtherType
 * 0x88b5 (IEEE 802 local experimental), then a 32-bit sequence number and
 * bytes (seq + j) & 0xff. */
#include "c/virtio.h"

#define NET_F_MTU 3
#define NET_F_MAC 5
#define NET_F_STATUS 16
#define NET_S_LINK_UP 1
#define HDR 12                 /* struct virtio_net_hdr with VERSION_1 (§5.1.6) */
#define RXQ 0
#define TXQ 1
#define NRX QSIZE              /* receive buffers posted: the whole ring */
#define BUFSZ 2048
#define RXAREA 0x400000u
#define TXAREA 0x410000u
#define RXBUF 0x500000u
#define TXBUF 0x600000u
#define ETYPE 0x88b5

static struct vq rx, tx;
static u32 base;
static int use_hlt = 1;
static int vmlab;             /* the device is vmlab's (VendorID) */
static u8 mac[6];
static volatile u32 irqs;
static u32 dev_irq;           /* the device's 8259 input */

/* -- interrupts: an IDT whose 8259 vectors (0x20-0x2f) all acknowledge the
 * device and send EOI to the 8259 (both for an input of the slave). */
struct idt_entry { u16 off_lo, sel; u8 zero, type; u16 off_hi; } __attribute__((packed));
struct idt_ptr { u16 limit; u32 base; } __attribute__((packed));
static struct idt_entry idt[256] __attribute__((aligned(8)));
void irq_stub(void);
__asm__(".globl irq_stub\nirq_stub:\n  pusha\n  cld\n  call irq_common\n  popa\n  iret\n");
__attribute__((used)) void irq_common(void) {
    irqs++;
    if (base) mmio_write(base + VM_INTERRUPT_ACK, mmio_read(base + VM_INTERRUPT_STATUS));
    if (dev_irq >= 8) outb(0xa0, 0x20);   /* the slave 8259 only for its own inputs */
    outb(0x20, 0x20);
}
static void irq_init(u32 irq) {
    dev_irq = irq;
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    for (int v = 0x20; v < 0x30; v++) {
        idt[v].off_lo = (u16)(u32)irq_stub; idt[v].off_hi = (u16)((u32)irq_stub >> 16);
        idt[v].sel = cs; idt[v].zero = 0; idt[v].type = 0x8e;
    }
    struct idt_ptr p = {sizeof idt - 1, (u32)idt};
    __asm__ volatile("lidt %0" :: "m"(p));
    /* 8259 ICW1-4: edge, cascade, vectors 0x20/0x28, 8086 mode */
    outb(0x20, 0x11); outb(0xa0, 0x11); outb(0x21, 0x20); outb(0xa1, 0x28);
    outb(0x21, 4); outb(0xa1, 2); outb(0x21, 1); outb(0xa1, 1);
    /* PIT channel 0 to mode 0 (one count, then silent): a periodic tick would
     * wake the CPU from every HLT for nothing (IRQ 0 is masked anyway). */
    outb(0x43, 0x30); outb(0x40, 0xff); outb(0x40, 0xff);
    u16 mask = (u16)~((1u << irq) | (irq >= 8 ? 4u : 0u));
    outb(0x21, (u8)mask); outb(0xa1, (u8)(mask >> 8));
}

/* Wait for the device: HLT with interrupts on (STI's one-instruction shadow
 * covers the HLT, so an interrupt cannot slip in between), or a pause. */
static void wait_dev(void) {
    if (use_hlt) __asm__ volatile("sti; hlt; cli" ::: "memory");
    else __asm__ volatile("pause" ::: "memory");
}

static void post_rx(u16 head) { vq_publish(&rx, head); }

static void fill_frame(u8 *f, u32 size, u32 seq) {
    memset(f, 0xff, 6);
    memcpy(f + 6, mac, 6);
    f[12] = ETYPE >> 8; f[13] = ETYPE & 0xff;
    *(u32 *)(f + 14) = seq;
    for (u32 j = 18; j < size; j++) f[j] = (u8)(seq + j);
}

/* Queue frame at TX buffer `slot` (header zeroed, frame already there). */
static void tx_add(u32 slot, u32 size) {
    struct buf b = {TXBUF + BUFSZ * slot, HDR + size, 0};
    tx.next_desc = (u16)slot;
    vq_publish(&tx, vq_add(&tx, &b, 1));
}
static void tx_reap(void) { u32 id, l; while (vq_used(&tx, &id, &l)) {} }

/* Next received frame: its RX descriptor (= buffer index) and frame length;
 * 0 when none. */
static int rx_next(u32 *idx, u32 *flen) {
    u32 id, l;
    if (!vq_used(&rx, &id, &l)) return 0;
    if (id >= NRX || l < HDR + 14 || l > HDR + 1518) {
        puts("FAIL: bad used element id="); puthex(id); puts(" len="); puthex(l); putc('\n');
        guest_fails++; done();
    }
    *idx = id; *flen = l - HDR;
    return 1;
}

static int payload_ok(const u8 *f, u32 size, u32 seq) {
    if (*(const u32 *)(f + 14) != seq) return 0;
    for (u32 j = 18; j < size; j++) if (f[j] != (u8)(seq + j)) return 0;
    return 1;
}

static void ping(u32 count, u32 size, u32 depth, int bench) {
    u32 seq = 0, got = 0, bad = 0, resends = 0;
    if (depth < 1) depth = 1;
    if (depth > NRX) depth = NRX;
    for (u32 k = 0; k < depth; k++) {
        memset((void *)(TXBUF + BUFSZ * k), 0, HDR);
        fill_frame((u8 *)(TXBUF + BUFSZ * k + HDR), size, k);
    }
    while (seq < count) {
        u32 n = count - seq < depth ? count - seq : depth;
        for (u32 k = 0; k < n; k++) {
            if (!bench) fill_frame((u8 *)(TXBUF + BUFSZ * k + HDR), size, seq + k);
            tx_add(k, size);
        }
        vq_kick(&tx);
        u32 have = 0, spins = 0;
        while (have < n) {
            u32 idx, flen;
            if (!rx_next(&idx, &flen)) {
                if (!use_hlt && ++spins > 2000000) {      /* no echo: send again */
                    spins = 0; resends++;
                    tx_reap();
                    for (u32 k = have; k < n; k++) tx_add(k, size);
                    vq_kick(&tx);
                }
                wait_dev();
                continue;
            }
            const u8 *f = (const u8 *)(RXBUF + BUFSZ * idx + HDR);
            u32 s = *(const u32 *)(f + 14);
            if (bench || (s >= seq + have && s < seq + n)) {   /* bench frames all carry 0..depth-1 */
                if (!bench) {
                    const u8 *h = (const u8 *)(RXBUF + BUFSZ * idx);
                    /* num_buffers 1 (§5.1.6.4); QEMU leaves it 0 without MRG_RXBUF */
                    if (flen != size || !payload_ok(f, size, s) || !memeq(f, mac, 6) || (h[10] != 1 && vmlab)) bad++;
                }
                have++;
                got++;
            }                                              /* else: a duplicate echo */
            post_rx((u16)idx);
        }
        vq_kick(&rx);
        tx_reap();
        seq += n;
    }
    check_eq(got, count, "ping: every frame came back");
    check_eq(bad, 0, "ping: echoes carry the frame (length, payload, our MAC as destination, num_buffers 1)");
    puts("INFO: frames="); putdec(got); puts(" resends="); putdec(resends); puts(" irqs="); putdec(irqs);
    putc('\n');
}

static void pong(u32 count, int bench) {
    u32 echoed = 0, last = 0;
    int finished = 0;
    while (!finished) {
        u32 idx, flen, n = 0;
        while (!n) {
            while (rx_next(&idx, &flen)) {
                u8 *f = (u8 *)(RXBUF + BUFSZ * idx + HDR);
                if (flen < 18) { post_rx((u16)idx); continue; }
                memcpy(f, f + 6, 6);                       /* destination: the sender */
                memcpy(f + 6, mac, 6);
                last = *(u32 *)(f + 14);
                struct buf b = {RXBUF + BUFSZ * idx, HDR + flen, 0};   /* echo in place */
                tx.next_desc = (u16)idx;
                vq_publish(&tx, vq_add(&tx, &b, 1));
                n++;
                if (last + 1 >= count || (bench && echoed + n >= count)) finished = 1;
            }
            if (!n) wait_dev();
        }
        vq_kick(&tx);
        /* Re-post the echoed buffers once the device has taken them. */
        u32 id, l, reaped = 0;
        while (reaped < n) {
            if (vq_used(&tx, &id, &l)) { post_rx((u16)id); reaped++; }
            else wait_dev();
        }
        vq_kick(&rx);
        echoed += n;
    }
    check(echoed >= count, "pong: echoed every frame");
    puts("INFO: echoed="); putdec(echoed); puts(" irqs="); putdec(irqs); putc('\n');
}

void guest_main(u32 magic, u32 mbinfo) {
    serial_init();
    const char *cl = cmdline(mbinfo);
    check_eq(magic, 0x2badb002u, "booted by a Multiboot loader");
    virtio_cmdline = cl;
    base = virtio_find(1, 0);
    if (!base) { puts("FAIL: no virtio-net device\n"); guest_fails++; done(); }
    vmlab = mmio_read(base + VM_VENDOR_ID) == VMLAB_VENDOR;
    use_hlt = !cmd_has(cl, "wait=poll");
    if (use_hlt) irq_init(virtio_irq(base));
    u64 feats = virtio_device_features(base);
    check_eq((u32)(feats >> NET_F_MAC) & 1, 1, "VIRTIO_NET_F_MAC offered");
    check_eq((u32)(feats >> NET_F_STATUS) & 1, 1, "VIRTIO_NET_F_STATUS offered");
    u64 want = (1ull << F_VERSION_1) | (1ull << NET_F_MAC) | (1ull << NET_F_STATUS) | (1ull << NET_F_MTU);
    check_eq(virtio_negotiate(base, want) & S_FEATURES_OK, S_FEATURES_OK, "FEATURES_OK accepted");
    if (!virtio_queue(&rx, base, RXQ, RXAREA) || !virtio_queue(&tx, base, TXQ, TXAREA)) {
        puts("FAIL: queues too small\n"); guest_fails++; done();
    }
    for (int k = 0; k < 6; k++) mac[k] = *(volatile u8 *)(base + VM_CONFIG + k);
    u16 status = *(volatile u16 *)(base + VM_CONFIG + 6);
    u16 mtu = *(volatile u16 *)(base + VM_CONFIG + 10);
    check_eq(status & NET_S_LINK_UP, NET_S_LINK_UP, "link is up");
    check(mtu >= 1500, "mtu >= 1500");
    puts("INFO: mac=");
    for (int k = 0; k < 6; k++) { putc("0123456789abcdef"[mac[k] >> 4]); putc("0123456789abcdef"[mac[k] & 15]); if (k < 5) putc(':'); }
    putc('\n');
    for (u16 k = 0; k < NRX; k++) {
        struct buf b = {RXBUF + BUFSZ * k, 1526, 1};
        vq_publish(&rx, vq_add(&rx, &b, 1));
    }
    virtio_driver_ok(base);
    check_eq(mmio_read(base + VM_STATUS), 15, "Status = ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK");
    vq_kick(&rx);
    if (cmd_has(cl, "bench")) tx.avail->flags = 1;   /* VIRTQ_AVAIL_F_NO_INTERRUPT: TX completes at the kick */
    u32 count = cmd_num(cl, "count", 10);
    if (cmd_has(cl, "mode=pong")) pong(count, cmd_has(cl, "bench"));
    else {
        u32 size = cmd_num(cl, "size", 1514);
        if (size < 60) size = 60;
        if (size > 1514) size = 1514;
        ping(count, size, cmd_num(cl, "depth", 1), cmd_has(cl, "bench"));
    }
    check_eq(mmio_read(base + VM_STATUS) & S_NEEDS_RESET, 0, "device never needed a reset");
    done();
}
