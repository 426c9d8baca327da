/* vmlab soft-MMU: the guest page walk run on every Unicorn TLB miss.
 *
 * SDM Vol. 3A chapter 4 ("Paging"): 32-bit paging (4.3, with PSE 4 MiB pages and
 * PSE-36), PAE paging (4.4), 4-level and 5-level paging (4.5); access rights
 * (4.6), #PF error codes (4.7), accessed and dirty flags (4.8).
 *
 * The pure-Python twin is emu/softmmu.py; tests/unit/test_softmmu_twin.py makes
 * them agree with hypothesis.  Guest data is hostile: every entry address is
 * bounds-checked against RAM, and the walk is bounded by the paging depth.
 */
#include <string.h>
#include "vmlab.h"

#define CR0_WP (1ull << 16)
#define CR0_PG (1ull << 31)
#define CR4_PSE (1ull << 4)
#define CR4_PAE (1ull << 5)
#define CR4_LA57 (1ull << 12)
#define CR4_SMEP (1ull << 20)
#define CR4_SMAP (1ull << 21)
#define EFER_LMA (1ull << 10)
#define EFER_NXE (1ull << 11)

#define PTE_P 1ull
#define PTE_RW 2ull
#define PTE_US 4ull
#define PTE_A 0x20ull
#define PTE_D 0x40ull
#define PTE_PS 0x80ull
#define PTE_NX (1ull << 63)

#define PF_P 1u
#define PF_RSVD 8u

/* A paging-structure entry outside RAM reads as 0 (not present): the walk
 * faults instead of touching host memory. */
static uint64_t phys_read(const vmlab_vcpu *v, uint64_t pa, unsigned size)
{
    uint64_t val = 0;
    if (pa > v->ram_size || v->ram_size - pa < size)
        return 0;
    memcpy(&val, v->ram + pa, size);
    return val;
}

static void phys_set_bits(vmlab_vcpu *v, uint64_t pa, unsigned size, uint64_t bits)
{
    uint64_t val;
    if (pa > v->ram_size || v->ram_size - pa < size)
        return;
    memcpy(&val, v->ram + pa, size < 8 ? 4 : 8);
    val |= bits;
    memcpy(v->ram + pa, &val, size < 8 ? 4 : 8);
}

static int fault(vmlab_walk *w, uint32_t code)
{
    w->fault = VMLAB_FAULT_PF;
    w->error_code = code;
    w->perms = 0;
    return VMLAB_FAULT_PF;
}

int vmlab_walk_do(vmlab_vcpu *v, uint64_t vaddr, uint32_t access, uint32_t flags, vmlab_walk *w)
{
    const int set_ad = flags & VMLAB_WALK_SET_AD;
    const int implicit = flags & VMLAB_WALK_IMPLICIT_SUP;
    const int user = (access & VMLAB_ACC_USER) && !implicit;
    const int is_write = access & VMLAB_ACC_WRITE;
    const int is_fetch = access & VMLAB_ACC_FETCH;
    const unsigned maxphy = v->maxphyaddr ? v->maxphyaddr : 40;
    uint64_t entry_size = 8, final_addr = 0, final_val = 0;
    int rw = 1, us = 1, nx = 0, reports_id = 0;

    memset(w, 0, sizeof(*w));
    w->vaddr = vaddr;
    w->access = access;

    if (!(v->cr0 & CR0_PG)) {
        /* No paging: linear = physical (32-bit wrap outside long mode). */
        w->paddr = (v->efer & EFER_LMA) ? vaddr : (vaddr & 0xffffffffull);
        w->page_size = 4096;
        w->perms = VMLAB_PROT_R | VMLAB_PROT_W | VMLAB_PROT_X;
        w->dirty = 1;
        goto check_bus;
    }

    const uint64_t phys_mask = (maxphy >= 64) ? ~0ull : ((1ull << maxphy) - 1);
    const uint64_t addr_mask = phys_mask & ~0xfffull;
    const uint64_t rsvd_hi = ~phys_mask & 0x000fffffffffffffull; /* bits maxphy..51 */
    const int nxe = (v->efer & EFER_NXE) != 0;
    const uint64_t nx_rsvd = nxe ? 0 : PTE_NX;
    /* PAE paging reserves bits 62:M of PDPTEs, PDEs and PTEs (SDM Vol. 3A
     * Tables 4-8..4-11, "62:M Reserved"); 4/5-level paging ignores 62:52. */
    const uint64_t pae_hi = (v->efer & EFER_LMA) ? 0 : 0x7ff0000000000000ull;
    const uint32_t acc_bits = (is_write ? 2u : 0u) | (user ? 4u : 0u);

    if (v->cr4 & CR4_PAE) {
        uint64_t table;
        int level;
        reports_id = nxe || (v->cr4 & CR4_SMEP);
        if (v->efer & EFER_LMA) {
            level = (v->cr4 & CR4_LA57) ? 5 : 4;
            table = v->cr3 & addr_mask;
        } else {
            /* PAE: the PDPTE is chosen by bits 31:30 (SDM 4.4.1). Its bits 2:1,
             * 8:5 and 63 (and above MAXPHYADDR) are reserved; R/W, U/S and XD
             * do not exist in a PDPTE. */
            uint64_t pa = (v->cr3 & 0xffffffe0ull) + ((vaddr >> 30) & 3) * 8;
            uint64_t e = phys_read(v, pa, 8);
            w->entry_addr[w->levels] = pa;
            w->entry_val[w->levels++] = e;
            if (!(e & PTE_P))
                return fault(w, acc_bits | (is_fetch && reports_id ? 16u : 0u));
            if (e & (rsvd_hi | pae_hi | 0x1e6ull | PTE_NX))
                return fault(w, PF_P | PF_RSVD | acc_bits | (is_fetch && reports_id ? 16u : 0u));
            table = e & addr_mask;
            level = 2;
        }
        for (; level >= 1; level--) {
            const unsigned shift = 12 + 9 * (level - 1);
            const uint64_t pa = table + ((vaddr >> shift) & 511) * 8;
            const uint64_t e = phys_read(v, pa, 8);
            uint64_t rsvd = rsvd_hi | pae_hi | nx_rsvd;
            w->entry_addr[w->levels] = pa;
            w->entry_val[w->levels++] = e;
            if (!(e & PTE_P))
                return fault(w, acc_bits | (is_fetch && reports_id ? 16u : 0u));
            int leaf = (level == 1);
            if (level >= 4) {
                rsvd |= PTE_PS;
            } else if (level == 3 && (e & PTE_PS)) {
                if (v->pdpe1gb)
                    rsvd |= 0x3fffe000ull; /* bits 29:13 of a 1 GiB PDPTE */
                else
                    rsvd |= PTE_PS;
                leaf = 1;
            } else if (level == 2 && (e & PTE_PS)) {
                rsvd |= 0x1fe000ull;       /* bits 20:13 of a 2 MiB PDE */
                leaf = 1;
            }
            if (e & rsvd)
                return fault(w, PF_P | PF_RSVD | acc_bits | (is_fetch && reports_id ? 16u : 0u));
            rw &= (e & PTE_RW) != 0;
            us &= (e & PTE_US) != 0;
            nx |= nxe && (e & PTE_NX);
            if (leaf) {
                w->page_size = 1ull << shift;
                w->paddr = (e & addr_mask & ~(w->page_size - 1)) | (vaddr & (w->page_size - 1));
                final_addr = pa;
                final_val = e;
                break;
            }
            if (set_ad && !(e & PTE_A))
                phys_set_bits(v, pa, 8, PTE_A);
            table = e & addr_mask;
        }
    } else {
        /* 32-bit paging (SDM 4.3): 4-byte entries, no XD, PSE 4 MiB pages. */
        entry_size = 4;
        reports_id = (v->cr4 & CR4_SMEP) != 0;
        uint64_t pa = (v->cr3 & 0xfffff000ull) + ((vaddr >> 22) & 1023) * 4;
        uint64_t e = phys_read(v, pa, 4);
        w->entry_addr[w->levels] = pa;
        w->entry_val[w->levels++] = e;
        if (!(e & PTE_P))
            return fault(w, acc_bits | (is_fetch && reports_id ? 16u : 0u));
        rw &= (e & PTE_RW) != 0;
        us &= (e & PTE_US) != 0;
        if ((e & PTE_PS) && (v->cr4 & CR4_PSE)) {
            /* PSE-36: PDE bits 20:13 hold physical-address bits 39:32; bit 21
             * and the bits above MAXPHYADDR are reserved. */
            uint64_t hi_bits = maxphy > 32 ? (maxphy - 32) : 0;
            uint64_t rsvd = (1ull << 21) | ((0xffull << 13) & ~(((1ull << hi_bits) - 1) << 13));
            if (e & rsvd)
                return fault(w, PF_P | PF_RSVD | acc_bits | (is_fetch && reports_id ? 16u : 0u));
            w->page_size = 4ull << 20;
            w->paddr = (e & 0xffc00000ull) | (((e >> 13) & 0xff) << 32) | (vaddr & 0x3fffff);
            final_addr = pa;
            final_val = e;
        } else {
            if (set_ad && !(e & PTE_A))
                phys_set_bits(v, pa, 4, PTE_A);
            pa = (e & 0xfffff000ull) + ((vaddr >> 12) & 1023) * 4;
            e = phys_read(v, pa, 4);
            w->entry_addr[w->levels] = pa;
            w->entry_val[w->levels++] = e;
            if (!(e & PTE_P))
                return fault(w, acc_bits | (is_fetch && reports_id ? 16u : 0u));
            rw &= (e & PTE_RW) != 0;
            us &= (e & PTE_US) != 0;
            w->page_size = 4096;
            w->paddr = (e & 0xfffff000ull) | (vaddr & 0xfff);
            final_addr = pa;
            final_val = e;
        }
    }

    /* Access rights (SDM 4.6.1). */
    {
        uint32_t perms;
        if (user) {
            perms = (us ? VMLAB_PROT_R : 0) | (us && rw ? VMLAB_PROT_W : 0) |
                    (us && !nx ? VMLAB_PROT_X : 0);
        } else {
            const int smap_block = (v->cr4 & CR4_SMAP) && us &&
                                   (implicit || !(flags & VMLAB_WALK_AC));
            const int can_write = rw || !(v->cr0 & CR0_WP);
            perms = (!smap_block ? VMLAB_PROT_R : 0) |
                    (!smap_block && can_write ? VMLAB_PROT_W : 0) |
                    (!nx && !((v->cr4 & CR4_SMEP) && us) ? VMLAB_PROT_X : 0);
        }
        const uint32_t need = is_write ? VMLAB_PROT_W : is_fetch ? VMLAB_PROT_X : VMLAB_PROT_R;
        if (!(perms & need))
            return fault(w, PF_P | acc_bits | (is_fetch && reports_id ? 16u : 0u));
        w->dirty = (final_val & PTE_D) != 0;
        if (set_ad) {
            uint64_t bits = 0;
            if (!(final_val & PTE_A))
                bits |= PTE_A;
            if (is_write && !(final_val & PTE_D)) {
                bits |= PTE_D;
                w->dirty = 1;
            }
            if (bits)
                phys_set_bits(v, final_addr, (unsigned)entry_size, bits);
        }
        /* Hand out a clean page without W so that the first store comes back
         * through the fill and sets D (SDM 4.8). */
        if (!w->dirty)
            perms &= ~VMLAB_PROT_W;
        w->perms = perms;
    }

check_bus:
    if ((w->paddr & ~0xfffull) >= v->ram_size) {
        w->fault = VMLAB_FAULT_BUS;
        return VMLAB_FAULT_BUS;
    }
    return VMLAB_OK;
}
