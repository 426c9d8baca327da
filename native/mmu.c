/* vmlab soft-MMU: the guest page walk run on every Unicorn TLB miss.
 *
 * SDM Vol. 3A chapter 4 ("Paging"): 32-bit paging (4.3, with PSE 4 MiB pages and
 * PSE-36), PAE paging (4.4), 4-level and 5-level paging (4.5); access rights
 * (4.6), #PF error codes (4.7), accessed and dirty flags (4.8).
 *
 * With vmlab_vcpu.ept_enabled the walk is two-dimensional (SDM Vol. 3C 29.3,
 * "The Extended Page Table Mechanism"): every guest-physical address it touches
 * -- each guest paging-structure entry, PAE PDPTEs included, and the final page
 * -- is first translated through the 4-level EPT.  Order of one nested walk:
 *   1. each guest entry, top level first: EPT-translate its guest-physical
 *      address as a read (as a write too when EPTP[6] enables EPT A/D, 29.3.5),
 *      read it, check it (#PF); a non-leaf entry that gets A=1 needs EPT W
 *      (A/D updates are data writes, 29.3.3.2);
 *   2. guest access rights (#PF);
 *   3. EPT-translate the final guest-physical address for the access (R/W/X);
 *   4. guest leaf A/D (needs EPT W on the leaf entry's page): last, so that an
 *      access that exits leaves the guest leaf as it was, like a #PF does.
 * Bus check on the host-physical address as before.
 *
 * The pure-Python twin is emu/softmmu.py; tests/unit/test_softmmu_twin.py and
 * tests/unit/test_ept.py make them agree with hypothesis.  Guest data is hostile:
 * every entry address (EPT entries too) is bounds-checked against RAM, and the
 * walk is bounded by the paging depth times the EPT's four levels.
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

/* EPT entries and EPTP (SDM Vol. 3C 25.6.11, 29.3.2, Tables 29-1..29-6). */
#define EPT_R 1ull
#define EPT_W 2ull
#define EPT_X 4ull
#define EPT_LARGE (1ull << 7)
#define EPT_A (1ull << 8)
#define EPT_D (1ull << 9)
#define EPTP_AD (1ull << 6)
#define EPT_NONLEAF_RSVD 0xf8ull   /* bits 7:3 of PML4Es and of entries referencing a table */

/* A paging-structure entry outside RAM reads as 0 (not present): the walk
 * faults instead of touching host memory. */
/* Guest RAM is two ranges: [0, ram_size) and [4 GiB, 4 GiB + ram_high); the
 * host mapping behind the hole between them is PROT_NONE (emu/memory.py), so
 * every guest-physical access must pass this check first. */
int vmlab_is_ram(const vmlab_vcpu *v, uint64_t pa, uint64_t len)
{
    const uint64_t high_base = 0x100000000ull;
    if (pa < v->ram_size)
        return len <= v->ram_size - pa;
    if (pa >= high_base && pa - high_base < v->ram_high)
        return len <= v->ram_high - (pa - high_base);
    return 0;
}

static uint64_t phys_read(const vmlab_vcpu *v, uint64_t pa, unsigned size)
{
    uint64_t val = 0;
    if (!vmlab_is_ram(v, pa, size))
        return 0;
    memcpy(&val, v->ram + pa, size);
    return val;
}

static void phys_set_bits(vmlab_vcpu *v, uint64_t pa, unsigned size, uint64_t bits)
{
    uint64_t val;
    if (!vmlab_is_ram(v, pa, size < 8 ? 4 : 8))
        return;
    memcpy(&val, v->ram + pa, size < 8 ? 4 : 8);
    val |= bits;
    memcpy(v->ram + pa, &val, size < 8 ? 4 : 8);
}

/* ---- EPT ----------------------------------------------------------------- */

/* One guest-physical -> host-physical translation, kept by the walk so that a
 * later fault on the same address (a guest A/D write) can report it. */
typedef struct ept_xlat {
    uint64_t hpa;
    uint64_t page_size;     /* 0 until a leaf is reached */
    uint32_t perms;         /* EPT_R|W|X ANDed over the entries used, 0 if one is not present */
    uint32_t dirty;         /* leaf D=1 (or now set), or EPT A/D disabled */
    uint32_t levels;
    uint64_t addr[4], val[4];
} ept_xlat;

static uint64_t phys_mask_of(const vmlab_vcpu *v)
{
    const unsigned maxphy = v->maxphyaddr ? v->maxphyaddr : 40;
    return (maxphy >= 64) ? ~0ull : ((1ull << maxphy) - 1);
}

/* Walk the EPT for gpa (SDM Vol. 3C 29.3.2).  need: EPT_R/W/X the access
 * requires; write: the access is a write for EPT dirty flags; set_ad: a real
 * access (EPTP[6] then sets EPT A/D flags).  Returns VMLAB_OK or the fault kind. */
static int ept_xlat_do(vmlab_vcpu *v, uint64_t gpa, uint32_t need, int write, int set_ad,
                       ept_xlat *x)
{
    const uint64_t eptp = v->eptp;
    const int ad = (eptp & EPTP_AD) != 0;
    const uint64_t phys_mask = phys_mask_of(v);
    const uint64_t addr_mask = phys_mask & ~0xfffull;
    const uint64_t rsvd_hi = ~phys_mask & 0x000fffffffffffffull;  /* bits 51:M */
    uint64_t table, e = 0, pa = 0;
    uint32_t perms = (uint32_t)(EPT_R | EPT_W | EPT_X);

    x->levels = 0;
    x->perms = 0;
    x->dirty = 1;
    x->page_size = 0;
    x->hpa = 0;
    /* EPTP (25.6.11): memory type UC or WB, page-walk length 4, bits 11:7 and
     * 63:M reserved.  VM entry refuses anything else (vmm/entry_checks.py);
     * should one get here anyway it is a misconfiguration, not a host crash. */
    {
        const uint64_t mt = eptp & 7;
        if ((mt != 0 && mt != 6) || ((eptp >> 3) & 7) != 3 || (eptp & (0xf80ull | ~phys_mask)))
            return VMLAB_FAULT_EPT_MISCONFIG;
    }
    table = eptp & addr_mask;
    for (int level = 4; level >= 1; level--) {
        const unsigned shift = 12 + 9 * (level - 1);
        pa = table + ((gpa >> shift) & 511) * 8;
        e = phys_read(v, pa, 8);
        x->addr[x->levels] = pa;
        x->val[x->levels++] = e;
        if (!(e & (EPT_R | EPT_W | EPT_X)))
            return VMLAB_FAULT_EPT_VIOLATION;       /* not present: bits 3-5 are 0 */
        /* Present without R is write-only / write-execute / execute-only:
         * misconfigurations, as vmlab does not advertise execute-only
         * (IA32_VMX_EPT_VPID_CAP[0] = 0), SDM 29.3.3.1. */
        if (!(e & EPT_R))
            return VMLAB_FAULT_EPT_MISCONFIG;
        const int leaf = level == 1 || (level <= 3 && (e & EPT_LARGE));
        uint64_t rsvd = rsvd_hi;
        if (!leaf) {
            rsvd |= EPT_NONLEAF_RSVD;
        } else {
            const uint64_t mt = (e >> 3) & 7;
            if (mt == 2 || mt == 3 || mt == 7)
                return VMLAB_FAULT_EPT_MISCONFIG;
            if (level == 3)
                rsvd |= 0x3ffff000ull;              /* bits 29:12 of a 1 GiB PDPTE */
            else if (level == 2)
                rsvd |= 0x1ff000ull;                /* bits 20:12 of a 2 MiB PDE */
        }
        if (e & rsvd)
            return VMLAB_FAULT_EPT_MISCONFIG;
        perms &= (uint32_t)(e & 7);
        if (leaf) {
            x->page_size = 1ull << shift;
            x->hpa = (e & addr_mask & ~(x->page_size - 1)) | (gpa & (x->page_size - 1));
            break;
        }
        /* A in a non-leaf entry used for the translation (29.3.5). */
        if (set_ad && ad && !(e & EPT_A))
            phys_set_bits(v, pa, 8, EPT_A);
        table = e & addr_mask;
    }
    x->perms = perms;
    if ((perms & need) != need)
        return VMLAB_FAULT_EPT_VIOLATION;
    x->dirty = !ad || (e & EPT_D);
    if (set_ad && ad) {
        uint64_t bits = (e & EPT_A) ? 0 : EPT_A;
        if (write && !(e & EPT_D))
            bits |= EPT_D;
        if (write)
            x->dirty = 1;
        if (bits)
            phys_set_bits(v, pa, 8, bits);
    }
    return VMLAB_OK;
}

static void ept_record(vmlab_walk *w, const ept_xlat *x)
{
    w->ept_levels = x->levels;
    w->ept_page_size = x->page_size;
    for (uint32_t i = 0; i < x->levels; i++) {
        w->ept_entry_addr[i] = x->addr[i];
        w->ept_entry_val[i] = x->val[i];
    }
    for (uint32_t i = x->levels; i < 4; i++)
        w->ept_entry_addr[i] = w->ept_entry_val[i] = 0;
}

/* Report an EPT fault.  qacc: Table 28-7 bits 2:0; where: bits 8:7. */
static int ept_fault(vmlab_walk *w, int kind, uint64_t gpa, uint32_t qacc, uint32_t where,
                     const ept_xlat *x)
{
    w->fault = (uint32_t)kind;
    w->perms = 0;
    w->gpa = gpa;
    w->gla = (where & VMLAB_EPTQ_GLA_VALID) ? w->vaddr : 0;
    /* No exit qualification for a misconfiguration (SDM Vol. 3C 28.2.1). */
    w->ept_qualification = kind == VMLAB_FAULT_EPT_VIOLATION ? (qacc | (x->perms << 3) | where) : 0;
    ept_record(w, x);
    return kind;
}

/* Read a guest paging-structure entry at guest-physical gpa (step 1 above). */
static int gpt_read(vmlab_vcpu *v, vmlab_walk *w, uint64_t gpa, unsigned size, int set_ad,
                    ept_xlat *x, uint64_t *e)
{
    if (!v->ept_enabled) {
        x->hpa = gpa;
        *e = phys_read(v, gpa, size);
        return VMLAB_OK;
    }
    /* Reads of guest paging structures are data reads; with EPT A/D they are
     * treated as writes, and a violation reports both bits 0 and 1 (29.3.5,
     * Table 28-7 note). */
    const int ad = (v->eptp & EPTP_AD) != 0;
    const int r = ept_xlat_do(v, gpa, (uint32_t)(ad ? EPT_R | EPT_W : EPT_R), ad, set_ad, x);
    if (r != VMLAB_OK)
        return ept_fault(w, r, gpa, VMLAB_EPTQ_READ | (ad ? VMLAB_EPTQ_WRITE : 0),
                         VMLAB_EPTQ_GLA_VALID, x);
    *e = phys_read(v, x->hpa, size);
    return VMLAB_OK;
}

/* Set A/D bits in a guest entry read through translation x: a data write. */
static int gpt_set_bits(vmlab_vcpu *v, vmlab_walk *w, uint64_t gpa, unsigned size, uint64_t bits,
                        const ept_xlat *x)
{
    if (v->ept_enabled && !(x->perms & EPT_W))
        return ept_fault(w, VMLAB_FAULT_EPT_VIOLATION, gpa, VMLAB_EPTQ_WRITE,
                         VMLAB_EPTQ_GLA_VALID, x);
    phys_set_bits(v, x->hpa, size, bits);
    return VMLAB_OK;
}

static uint32_t ept_need(uint32_t access)
{
    return (uint32_t)((access & VMLAB_ACC_WRITE) ? EPT_W
                    : (access & VMLAB_ACC_FETCH) ? EPT_X : EPT_R);
}

static uint32_t ept_qacc(uint32_t access)
{
    return (access & VMLAB_ACC_WRITE) ? VMLAB_EPTQ_WRITE
         : (access & VMLAB_ACC_FETCH) ? VMLAB_EPTQ_FETCH : VMLAB_EPTQ_READ;
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
    int rw = 1, us = 1, nx = 0, reports_id = 0, r;
    uint32_t perms;
    ept_xlat gx;   /* translation of the last guest entry read (the leaf, in the end) */

    memset(w, 0, sizeof(*w));
    w->vaddr = vaddr;
    w->access = access;

    if (!(v->cr0 & CR0_PG)) {
        /* No paging: linear = (guest-)physical (32-bit wrap outside long mode). */
        w->gpa = (v->efer & EFER_LMA) ? vaddr : (vaddr & 0xffffffffull);
        w->page_size = 4096;
        perms = VMLAB_PROT_R | VMLAB_PROT_W | VMLAB_PROT_X;
        goto final;
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
            uint64_t e;
            if ((r = gpt_read(v, w, pa, 8, set_ad, &gx, &e)) != VMLAB_OK)
                return r;
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
            uint64_t e;
            if ((r = gpt_read(v, w, pa, 8, set_ad, &gx, &e)) != VMLAB_OK)
                return r;
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
                w->gpa = (e & addr_mask & ~(w->page_size - 1)) | (vaddr & (w->page_size - 1));
                final_addr = pa;
                final_val = e;
                break;
            }
            if (set_ad && !(e & PTE_A) && (r = gpt_set_bits(v, w, pa, 8, PTE_A, &gx)) != VMLAB_OK)
                return r;
            table = e & addr_mask;
        }
    } else {
        /* 32-bit paging (SDM 4.3): 4-byte entries, no XD, PSE 4 MiB pages. */
        entry_size = 4;
        reports_id = (v->cr4 & CR4_SMEP) != 0;
        uint64_t pa = (v->cr3 & 0xfffff000ull) + ((vaddr >> 22) & 1023) * 4;
        uint64_t e;
        if ((r = gpt_read(v, w, pa, 4, set_ad, &gx, &e)) != VMLAB_OK)
            return r;
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
            w->gpa = (e & 0xffc00000ull) | (((e >> 13) & 0xff) << 32) | (vaddr & 0x3fffff);
            final_addr = pa;
            final_val = e;
        } else {
            if (set_ad && !(e & PTE_A) && (r = gpt_set_bits(v, w, pa, 4, PTE_A, &gx)) != VMLAB_OK)
                return r;
            pa = (e & 0xfffff000ull) + ((vaddr >> 12) & 1023) * 4;
            if ((r = gpt_read(v, w, pa, 4, set_ad, &gx, &e)) != VMLAB_OK)
                return r;
            w->entry_addr[w->levels] = pa;
            w->entry_val[w->levels++] = e;
            if (!(e & PTE_P))
                return fault(w, acc_bits | (is_fetch && reports_id ? 16u : 0u));
            rw &= (e & PTE_RW) != 0;
            us &= (e & PTE_US) != 0;
            w->page_size = 4096;
            w->gpa = (e & 0xfffff000ull) | (vaddr & 0xfff);
            final_addr = pa;
            final_val = e;
        }
    }

    /* Access rights (SDM 4.6.1). */
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
    {
        const uint32_t need = is_write ? VMLAB_PROT_W : is_fetch ? VMLAB_PROT_X : VMLAB_PROT_R;
        if (!(perms & need)) {
            if (!v->ept_enabled)
                w->paddr = w->gpa;
            return fault(w, PF_P | acc_bits | (is_fetch && reports_id ? 16u : 0u));
        }
    }

final:;
    /* The final guest-physical address (step 3), then the guest leaf's A/D (step 4). */
    int dirty = 1;
    if (v->ept_enabled) {
        ept_xlat fx;
        r = ept_xlat_do(v, w->gpa, ept_need(access), is_write, set_ad, &fx);
        if (r != VMLAB_OK)
            return ept_fault(w, r, w->gpa, ept_qacc(access),
                             VMLAB_EPTQ_GLA_VALID | VMLAB_EPTQ_TRANSLATED, &fx);
        ept_record(w, &fx);
        w->paddr = fx.hpa;
        perms &= fx.perms;            /* EPT R/W/X and VMLAB_PROT_R/W/X share bits 0-2 */
        dirty = (int)fx.dirty;
    } else {
        w->paddr = w->gpa;
    }
    if (w->levels) {
        int leaf_dirty = (final_val & PTE_D) != 0;
        if (set_ad) {
            uint64_t bits = 0;
            if (!(final_val & PTE_A))
                bits |= PTE_A;
            if (is_write && !(final_val & PTE_D)) {
                bits |= PTE_D;
                leaf_dirty = 1;
            }
            if (bits) {
                r = gpt_set_bits(v, w, final_addr, (unsigned)entry_size, bits, &gx);
                if (r != VMLAB_OK)
                    return r;
            }
        }
        dirty &= leaf_dirty;
    }
    /* Hand out a clean page without W so that the first store comes back
     * through the fill and sets D (SDM 4.8; EPT D with EPT A/D, 29.3.5). */
    w->dirty = (uint32_t)dirty;
    if (!dirty)
        perms &= ~VMLAB_PROT_W;
    w->perms = perms;

    if (!vmlab_is_ram(v, w->paddr & ~0xfffull, 4096)) {
        w->fault = VMLAB_FAULT_BUS;
        return VMLAB_FAULT_BUS;
    }
    return VMLAB_OK;
}

/* A guest-physical access with no linear address (Table 28-7 bit 7 = 0): the
 * EPT alone.  It is a real access: with EPTP[6] it sets EPT A/D flags.  With
 * EPT off, gpa is the physical address. */
int vmlab_ept_translate(vmlab_vcpu *v, uint64_t gpa, uint32_t access, vmlab_walk *w)
{
    memset(w, 0, sizeof(*w));
    w->access = access;
    w->gpa = gpa;
    if (!v->ept_enabled) {
        w->paddr = gpa;
        w->page_size = 4096;
        w->perms = VMLAB_PROT_R | VMLAB_PROT_W | VMLAB_PROT_X;
        w->dirty = 1;
    } else {
        ept_xlat x;
        const int r = ept_xlat_do(v, gpa, ept_need(access), (access & VMLAB_ACC_WRITE) != 0, 1, &x);
        if (r != VMLAB_OK)
            return ept_fault(w, r, gpa, ept_qacc(access), 0, &x);
        ept_record(w, &x);
        w->paddr = x.hpa;
        w->page_size = x.page_size;
        w->dirty = x.dirty;
        w->perms = x.dirty ? x.perms : (x.perms & ~(uint32_t)VMLAB_PROT_W);
    }
    if (!vmlab_is_ram(v, w->paddr & ~0xfffull, 4096)) {
        w->fault = VMLAB_FAULT_BUS;
        return VMLAB_FAULT_BUS;
    }
    return VMLAB_OK;
}

/* Benchmark kernel (tools/bench_tlb.py): n side-effect-free walks, as a TLB
 * fill would make them, without one cffi call per walk.  The checksum keeps
 * the compiler from dropping the work and lets the caller compare results. */
uint64_t vmlab_walk_bench(vmlab_vcpu *v, const uint64_t *vaddrs, int n, uint32_t access)
{
    uint64_t sum = 0;
    vmlab_walk w;
    for (int i = 0; i < n; i++) {
        const int r = vmlab_walk_do(v, vaddrs[i], access, 0, &w);
        sum = sum * 31 + (w.paddr ^ ((uint64_t)r << 56));
    }
    return sum;
}
