/* Split virtqueue fast paths for virtio-blk and virtio-net (virtio 1.2 §2.7,
 * §5.1, §5.2): whole batches of the common chain shapes in one call, no
 * Python per request, frame or descriptor.
 *
 * Each routine here has a pure-Python twin with the same API and the same
 * result in devices/virtio/virtq.py (tests compare them on hypothesis-generated
 * rings).  The routines only ever handle what they are sure of: a ring or a
 * chain they do not accept (anything the Python walk in devices/virtio/queue.py
 * would reject, and shapes that are legal but unusual) stops the batch with
 * VMLAB_VQ_STOP_PUNT *before* that chain is taken, and the Python device model
 * carries on from there with its own checks and error statuses.
 *
 * The guest is hostile: every guest-physical range is checked to lie inside
 * one RAM range -- [0, low) or [4 GiB, 4 GiB + high), never the 32-bit hole
 * between them (emu/memory.py) -- before it is touched (vq_in_ram), every
 * walk is bounded (the
 * queue size, VMLAB_VQ_MAX_INDIRECT, VMLAB_VQ_MAX_SEGS), nothing trusts a
 * value read from guest memory, and the rings are read with memcpy (no
 * alignment assumed).  The host is little-endian (x86-64), like the le16/le32/
 * le64 fields of §2.7.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include "vmlab.h"

/* §2.7.5 "The Virtqueue Descriptor Table" flags */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4

/* §5.2.6 request types and status values */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define SECTOR 512

#define NET_HDR_LEN 12      /* struct virtio_net_hdr with VIRTIO_F_VERSION_1 (§5.1.6) */
#define ETH_HLEN 14

typedef struct {
    uint64_t addr;
    uint32_t len;
    uint32_t write;
} vq_seg;

#define VQ_HIGH_RAM_BASE (1ull << 32)

typedef struct {
    uint64_t low;              /* RAM [0, low) */
    uint64_t high;             /* and [4 GiB, 4 GiB + high) */
} vq_ram;

/* [addr, addr + len) inside one RAM range (the twin of GuestMemory.contains) */
static int vq_in_ram(const vq_ram *m, uint64_t addr, uint64_t len)
{
    if (addr < m->low)
        return len <= m->low - addr;
    if (addr < VQ_HIGH_RAM_BASE)
        return 0;                             /* the hole: devices, open bus */
    uint64_t off = addr - VQ_HIGH_RAM_BASE;
    return off < m->high && len <= m->high - off;
}

/* A batch's result before it starts (the twin: Result()). */
static void vq_result_init(vmlab_vq_result *res)
{
    memset(res, 0, sizeof *res);
    res->dma_lo = ~0ull;
    res->stop = VMLAB_VQ_STOP_PUNT;
}

/* Widen the span of guest RAM the device wrote (vmlab_vq_result.dma_*). */
static void vq_span(vmlab_vq_result *res, uint64_t addr, uint64_t len)
{
    if (!len)
        return;
    if (addr < res->dma_lo)
        res->dma_lo = addr;
    if (addr + len > res->dma_hi)
        res->dma_hi = addr + len;
}

static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static void wr16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* The ring checks of SplitQueue.check() plus the available idx check of
 * SplitQueue.pending(): 1 if the queue may be used, with *count the chains
 * available. */
static int vq_ring_ok(const uint8_t *ram, const vq_ram *m, const vmlab_vq *q, uint32_t *count)
{
    uint32_t n = q->size;
    if (!q->ready || n == 0 || n > q->max_size || (n & (n - 1)))
        return 0;
    if (q->desc % 16 || q->avail % 2 || q->used % 4)       /* §2.7 alignment table */
        return 0;
    if (!vq_in_ram(m, q->desc, 16ull * n) || !vq_in_ram(m, q->avail, 6ull + 2ull * n)
        || !vq_in_ram(m, q->used, 6ull + 8ull * n))
        return 0;
    uint32_t c = (uint16_t)(rd16(ram + q->avail + 2) - q->last_avail);
    if (c > n)
        return 0;
    *count = c;
    return 1;
}

/* The head of the next available chain, or -1 if it is out of range. */
static int vq_head(const uint8_t *ram, const vmlab_vq *q)
{
    uint32_t n = q->size;
    uint16_t head = rd16(ram + q->avail + 4 + 2ull * (q->last_avail % n));
    return head < n ? head : -1;
}

/* Walk the chain at `head` like SplitQueue._walk; returns the number of
 * non-empty buffers put in segs, or -1 (punt) for anything _walk would reject,
 * and for chains of more than `max` buffers.  *rlen / *wlen get the readable /
 * writable byte counts. */
static int vq_walk(const uint8_t *ram, const vq_ram *m, const vmlab_vq *q, uint32_t head, vq_seg *segs,
                   int max, uint64_t *rlen, uint64_t *wlen)
{
    const uint8_t *table = ram + q->desc;
    uint32_t n = q->size, i = head, limit = n;
    int in_indirect = 0, k = 0, writable = 0;
    uint64_t total = 0;
    *rlen = *wlen = 0;
    for (;;) {
        if (limit == 0)
            return -1;                        /* longer than the queue: a loop (§2.7.5.3.1) */
        limit--;
        const uint8_t *d = table + 16ull * i;
        uint64_t addr = rd64(d);
        uint32_t len = rd32(d + 8);
        uint16_t flags = rd16(d + 12), nxt = rd16(d + 14);
        if (flags & VIRTQ_DESC_F_INDIRECT) {
            if (in_indirect || (flags & VIRTQ_DESC_F_NEXT))
                return -1;                    /* §2.7.5.3.1: one table, no INDIRECT|NEXT */
            if (len == 0 || len % 16 || len / 16 > VMLAB_VQ_MAX_INDIRECT || !vq_in_ram(m, addr, len))
                return -1;
            table = ram + addr;
            n = limit = len / 16;
            i = 0;
            in_indirect = 1;
            continue;
        }
        if (len) {
            if (!vq_in_ram(m, addr, len))
                return -1;
            total += len;
            if (total > (1ull << 32))
                return -1;                    /* §2.7.5.2: at most 2^32 bytes */
            if (flags & VIRTQ_DESC_F_WRITE) {
                writable = 1;
                *wlen += len;
            } else if (writable) {
                return -1;                    /* §2.7.4.2: readable after writable */
            } else {
                *rlen += len;
            }
            if (k >= max)
                return -1;
            segs[k].addr = addr;
            segs[k].len = len;
            segs[k].write = (flags & VIRTQ_DESC_F_WRITE) ? 1 : 0;
            k++;
        }
        if (!(flags & VIRTQ_DESC_F_NEXT))
            return k;
        if (nxt >= n)
            return -1;
        i = nxt;
    }
}

static void vq_put_used(uint8_t *ram, vmlab_vq *q, uint32_t head, uint32_t len)
{
    uint8_t *e = ram + q->used + 4 + 8ull * (q->used_idx % q->size);
    wr32(e, head);
    wr32(e + 4, len);
    q->used_idx = (uint16_t)(q->used_idx + 1);
}

/* After a batch: the used idx (§2.7.8.2: after the ring entries) and, with
 * VIRTIO_F_EVENT_IDX, avail_event (§2.7.10) when chains were taken. */
static void vq_finish(uint8_t *ram, vmlab_vq *q, uint32_t taken, uint32_t used)
{
    if (used)
        wr16(ram + q->used + 2, q->used_idx);
    if (taken && q->event_idx)
        wr16(ram + q->used + 4 + 8ull * q->size, q->last_avail);
}

/* Full-length positional I/O over iov (retrying short transfers, EINTR);
 * reads past the end of the file read zeroes.  0 or -1. */
static int vq_io(int fd, struct iovec *iov, int niov, uint64_t off, int write)
{
    while (niov > 0) {
        ssize_t r = write ? pwritev(fd, iov, niov, (off_t)off) : preadv(fd, iov, niov, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            if (write)
                return -1;
            for (int j = 0; j < niov; j++)
                memset(iov[j].iov_base, 0, iov[j].iov_len);
            return 0;
        }
        off += (uint64_t)r;
        while (niov > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            niov--;
        }
        if (niov > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

int vmlab_vq_blk(uint8_t *ram, uint64_t ram_low, uint64_t ram_high, vmlab_vq *q, int fd, uint64_t capacity, uint32_t allow_write,
                 vmlab_vq_result *res)
{
    vq_ram m = {ram_low, ram_high};
    vq_seg segs[VMLAB_VQ_MAX_SEGS];
    struct iovec iov[VMLAB_VQ_MAX_SEGS];
    uint32_t count = 0, taken = 0;
    vq_result_init(res);
    if (vq_ring_ok(ram, &m, q, &count)) {
        res->stop = VMLAB_VQ_STOP_EMPTY;
        for (; taken < count; taken++) {
            int head = vq_head(ram, q);
            uint64_t rlen, wlen;
            int k = head < 0 ? -1 : vq_walk(ram, &m, q, (uint32_t)head, segs, VMLAB_VQ_MAX_SEGS, &rlen, &wlen);
            /* The plain shape (§5.2.6): a readable 16-byte header buffer, then
             * out-data (OUT) or in-data (IN), then the writable status byte. */
            if (k < 2 || segs[0].write || segs[0].len != 16 || !segs[k - 1].write) {
                res->stop = VMLAB_VQ_STOP_PUNT;
                break;
            }
            uint32_t type = rd32(ram + segs[0].addr);
            uint64_t sector = rd64(ram + segs[0].addr + 8);
            vq_seg *st = &segs[k - 1];
            uint64_t status_addr = st->addr + st->len - 1;
            int first_w = 1;
            while (first_w < k && !segs[first_w].write)
                first_w++;
            int niov = 0, write = 0;
            uint64_t nbytes = 0;
            if (type == VIRTIO_BLK_T_IN && first_w == 1) {
                for (int j = 1; j < k; j++) {
                    uint32_t l = j == k - 1 ? st->len - 1 : segs[j].len;
                    if (l) {
                        iov[niov].iov_base = ram + segs[j].addr;
                        iov[niov++].iov_len = l;
                        nbytes += l;
                    }
                }
            } else if (type == VIRTIO_BLK_T_OUT && allow_write && first_w == k - 1 && st->len == 1) {
                write = 1;
                for (int j = 1; j < k - 1; j++) {
                    iov[niov].iov_base = ram + segs[j].addr;
                    iov[niov++].iov_len = segs[j].len;
                    nbytes += segs[j].len;
                }
            } else {
                res->stop = VMLAB_VQ_STOP_PUNT;
                break;
            }
            uint8_t status = VIRTIO_BLK_S_OK;
            uint32_t used = 1;
            if (nbytes % SECTOR || sector > capacity / SECTOR || nbytes > capacity - sector * SECTOR) {
                status = VIRTIO_BLK_S_IOERR;       /* §5.2.6.2: past the end, or not whole sectors */
            } else {
                if (!write)
                    for (int j = 0; j < niov; j++)
                        vq_span(res, (uint64_t)((uint8_t *)iov[j].iov_base - ram), iov[j].iov_len);
                if (niov && vq_io(fd, iov, niov, sector * SECTOR, write) < 0)
                    status = VIRTIO_BLK_S_IOERR;
                else if (!write)
                    used += (uint32_t)nbytes;
            }
            ram[status_addr] = status;
            vq_span(res, status_addr, 1);
            vq_put_used(ram, q, (uint32_t)head, used);
            q->last_avail = (uint16_t)(q->last_avail + 1);
            res->done++;
            if (status == VIRTIO_BLK_S_OK)
                res->ok++;
            else
                res->errors++;
            if (write)
                res->wrote++;
            res->bytes += status == VIRTIO_BLK_S_OK ? nbytes : 0;
        }
    }
    vq_finish(ram, q, taken, res->done);
    return (int)res->done;
}

int vmlab_vq_net_tx(uint8_t *ram, uint64_t ram_low, uint64_t ram_high, vmlab_vq *q, uint32_t max_frame, uint8_t *out,
                    uint64_t out_cap, uint32_t *lens, uint32_t max_frames, vmlab_vq_result *res)
{
    vq_ram m = {ram_low, ram_high};
    vq_seg segs[VMLAB_VQ_MAX_SEGS];
    uint32_t count = 0, taken = 0;
    uint64_t pos = 0;
    vq_result_init(res);
    if (vq_ring_ok(ram, &m, q, &count)) {
        res->stop = VMLAB_VQ_STOP_EMPTY;
        for (; taken < count; taken++) {
            int head = vq_head(ram, q);
            uint64_t rlen, wlen;
            int k = head < 0 ? -1 : vq_walk(ram, &m, q, (uint32_t)head, segs, VMLAB_VQ_MAX_SEGS, &rlen, &wlen);
            if (k < 0) {
                res->stop = VMLAB_VQ_STOP_PUNT;
                break;
            }
            /* §5.1.6.2: the header, then the frame, all device-readable; any
             * other chain is dropped (returned with used length 0). */
            int drop = wlen != 0 || rlen < NET_HDR_LEN + ETH_HLEN || rlen - NET_HDR_LEN > max_frame;
            if (!drop) {
                uint64_t n = rlen - NET_HDR_LEN;
                if (res->frames >= max_frames || n > out_cap - pos) {
                    res->stop = VMLAB_VQ_STOP_FULL;
                    break;
                }
                uint64_t skip = NET_HDR_LEN;
                for (int j = 0; j < k; j++) {
                    uint64_t l = segs[j].len;
                    if (skip >= l) {
                        skip -= l;
                        continue;
                    }
                    memcpy(out + pos, ram + segs[j].addr + skip, l - skip);
                    pos += l - skip;
                    skip = 0;
                }
                lens[res->frames++] = (uint32_t)n;
                res->bytes += n;
            } else {
                res->errors++;
            }
            vq_put_used(ram, q, (uint32_t)head, 0);
            q->last_avail = (uint16_t)(q->last_avail + 1);
            res->done++;
        }
    }
    vq_finish(ram, q, taken, res->done);
    return (int)res->done;
}

int vmlab_vq_net_rx(uint8_t *ram, uint64_t ram_low, uint64_t ram_high, vmlab_vq *q, uint32_t max_frame, const uint8_t *frames,
                    const uint32_t *lens, uint32_t nframes, const uint8_t *hdr, vmlab_vq_result *res)
{
    vq_ram m = {ram_low, ram_high};
    vq_seg segs[VMLAB_VQ_MAX_SEGS];
    uint32_t count = 0, taken = 0, fi = 0;
    uint64_t fpos = 0;
    vq_result_init(res);
    if (vq_ring_ok(ram, &m, q, &count)) {
        res->stop = VMLAB_VQ_STOP_EMPTY;
        for (; taken < count; taken++) {
            if (fi >= nframes) {
                res->stop = VMLAB_VQ_STOP_FULL;
                break;
            }
            int head = vq_head(ram, q);
            uint64_t rlen, wlen;
            int k = head < 0 ? -1 : vq_walk(ram, &m, q, (uint32_t)head, segs, VMLAB_VQ_MAX_SEGS, &rlen, &wlen);
            /* §5.1.6.3: receive buffers are device-writable, with room for the header */
            if (k < 0 || rlen != 0 || wlen < NET_HDR_LEN) {
                res->stop = VMLAB_VQ_STOP_PUNT;
                break;
            }
            uint64_t room = wlen - NET_HDR_LEN;
            /* The next frame that fits; the ones that do not are dropped. */
            while (fi < nframes && (lens[fi] > room || lens[fi] > max_frame)) {
                fpos += lens[fi++];
                res->errors++;
            }
            if (fi >= nframes) {
                res->stop = VMLAB_VQ_STOP_FULL;  /* the chain stays available for the next frame */
                break;
            }
            const uint8_t *f = frames + fpos;
            uint64_t n = NET_HDR_LEN + (uint64_t)lens[fi], done = 0;
            for (int j = 0; j < k && done < n; j++) {
                uint64_t l = segs[j].len < n - done ? segs[j].len : n - done;
                uint8_t *dst = ram + segs[j].addr;
                uint64_t h = done < NET_HDR_LEN ? NET_HDR_LEN - done : 0;
                if (h > l)
                    h = l;
                if (h)
                    memcpy(dst, hdr + done, h);
                if (l > h)
                    memcpy(dst + h, f + (done + h - NET_HDR_LEN), l - h);
                vq_span(res, segs[j].addr, l);
                done += l;
            }
            vq_put_used(ram, q, (uint32_t)head, (uint32_t)n);
            q->last_avail = (uint16_t)(q->last_avail + 1);
            res->done++;
            res->frames++;
            res->bytes += lens[fi];
            fpos += lens[fi++];
        }
    }
    res->consumed = fi;
    vq_finish(ram, q, taken, res->done);
    return (int)res->done;
}
