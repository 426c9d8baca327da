/* Guest-visible VMX (vmm/nested.py): L1's VMREAD/VMWRITE of its current VMCS
 * served without leaving C.
 *
 * While the guest hypervisor (L1) runs in VMX root operation with a current
 * VMCS, Python copies the fields an exit handler typically reads or writes
 * into a vmlab_vmx_shadow table (not VMCS shadowing of SDM 25.10, which is a
 * VMX feature for L1; this is vmlab's own cache).  vmlab_run_exit_vmx wraps
 * vmlab_run_exit: at a trap site that is a VMREAD or VMWRITE between
 * registers, in 64-bit mode at CPL 0, of a field in the table -- or of any
 * other supported field, in the VMCS's own native area (vmcs.c) --, it does what
 * SDM Vol. 3C 31.3 "VMREAD"/"VMWRITE" Operation says once every #UD, #GP and
 * VMfail condition is known not to hold -- the register gets the field (or
 * the field the register, truncated to the field's width), RFLAGS.CF, PF, AF,
 * ZF, SF and OF are cleared ("VMsucceed", 31.2) -- moves RIP past it and runs
 * on.  Anything else returns to Python, which syncs the table first.  The
 * Python twin is vmm/nested_shadow.py (tests compare the two). */
#include <string.h>
#include "vmlab.h"

static int level_load_fresh(vmlab_vcpu *v, void *uc, vmlab_regs *r, const uint64_t *img);

#define SH_HF_CPL 3u
#define SH_HF_INHIBIT_IRQ (1u << 3)
#define SH_HF_CS64 (1u << 15)
#define SH_RFLAGS_TF (1ull << 8)
#define SH_RFLAGS_VMSUCCEED_CLEAR 0x8D5ull     /* CF PF AF ZF SF OF */
#define SH_CR4_VMXE (1ull << 13)

int vmlab_vmx_shadow_insn(const uint8_t *code, uint32_t n, uint64_t *gpr, uint64_t *rflags,
                          vmlab_vmx_shadow *s)
{
    uint32_t i = 0, rex = 0;
    if (n >= 1 && (code[0] & 0xF0) == 0x40) {
        rex = code[0];
        i = 1;
    }
    if (n < i + 3 || code[i] != 0x0F || (code[i + 1] != 0x78 && code[i + 1] != 0x79) || (code[i + 2] >> 6) != 3)
        return 0;
    const int is_write = code[i + 1] == 0x79;
    const uint8_t m = code[i + 2];
    const uint32_t reg = (((rex >> 2) & 1) << 3) | ((m >> 3) & 7);   /* the field encoding */
    const uint32_t rm = ((rex & 1) << 3) | (m & 7);                   /* VMREAD's destination, VMWRITE's source */
    const uint32_t enc = (uint32_t)gpr[reg];
    uint32_t k;
    const uint32_t count = s->n < VMLAB_VMX_SHADOW_MAX ? s->n : VMLAB_VMX_SHADOW_MAX;
    for (k = 0; k < count; k++)
        if (s->enc[k] == enc)
            break;
    if (k == count) {
        /* Not in the table: any supported field, full access (bit 0 clear),
         * in the VMCS area (bits 31:15 and 12 zero, index below 64: the
         * area's layout; readable: an Appendix B field). */
        if (!s->vmcs || enc >= 0x8000 || (enc & 0x1001) || ((enc >> 1) & 0x1FF) >= 64)
            return 0;
        const uint32_t slot = vmlab_vmcs_slot(enc);
        if (!s->readable[slot])
            return 0;
        if (is_write) {
            /* bits 11:10 type 1: a VM-exit information field (VMfailValid 13
             * without IA32_VMX_MISC[29]: Python's); bits 14:13 the width */
            const uint32_t width = (enc >> 13) & 3;
            if (((enc >> 10) & 3) == 1 && !s->vmwrite_any)
                return 0;
            const uint64_t mask = width == 0 ? 0xFFFFull : width == 2 ? 0xFFFFFFFFull : ~0ull;
            s->vmcs[slot] = gpr[rm] & mask;
            s->vmcs_dirty[slot >> 6] |= 1ull << (slot & 63);
        } else {
            gpr[rm] = s->vmcs[slot];
        }
        *rflags &= ~SH_RFLAGS_VMSUCCEED_CLEAR;
        s->hits++;
        return (int)(i + 3);
    }
    if (is_write) {
        if (!s->writable[k])
            return 0;
        s->value[k] = gpr[rm] & s->mask[k];
        s->dirty |= 1ull << k;
    } else {
        gpr[rm] = s->value[k];
    }
    *rflags &= ~SH_RFLAGS_VMSUCCEED_CLEAR;
    s->hits++;
    return (int)(i + 3);
}

/* VMRESUME (0F 01 C3) of L1 that needs nothing Python knows: the SDM Vol. 3C
 * 31.3 "VMRESUME" Operation for a launched current VMCS whose entry checks
 * (ch. 27) passed at the previous entry, when since L2's last VM exit L1
 * wrote either nothing but read-only fields (exit information: no checks) or
 * nothing but GUEST_RIP/GUEST_RSP -- then RIP's own check (27.3.1.4: bits
 * 63:32 zero unless "IA-32e mode guest" and CS.L, else canonical) is made
 * here.  Python sets entry_ready only when the controls are those the trap
 * sites and the fast-path policy were made for, no event is to be injected,
 * and there is no monitor trap flag, interrupt-window exiting or preemption
 * timer.  An interrupt waiting for L1's window (irq_window) or NMIs blocked
 * (the IRET trap is armed exactly then) leave it to Python, whose arbiter
 * decides them at the entry.  Twin: vmm/nested_shadow.py resume_ok. */
int vmlab_vmx_resume_ok(const uint8_t *code, uint32_t n, uint32_t irq_window, uint32_t trap_kinds,
                        const vmlab_vmx_shadow *s)
{
    if (!s->entry_ready || n < 3 || code[0] != 0x0F || code[1] != 0x01 || code[2] != 0xC3)
        return 0;
    if (irq_window || (trap_kinds & (1u << VMLAB_TRAP_IRET)))
        return 0;
    for (int w = 0; w < 16; w++)
        if (s->vmcs_dirty[w])
            return 0;             /* a field outside the table was written: Python checks the entry */
    const uint64_t d = s->dirty, rr = d & s->entry_rip_rsp, cheap = d & s->entry_cheap;
    if ((d & ~(rr | cheap)) || (rr && cheap))
        return 0;
    if (rr && s->rip_k < VMLAB_VMX_SHADOW_MAX) {
        const uint64_t rip = s->value[s->rip_k];
        if (!s->rip_bits) {
            if (rip >> 32)
                return 0;
        } else if (s->rip_bits < 64) {
            const uint64_t top = rip >> (s->rip_bits - 1);
            if (top != 0 && top != (~0ull >> (s->rip_bits - 1)))
                return 0;
        }
    }
    return 3;
}

/* The VM entry itself: L2's stored state with the table's RIP and RSP, EPT,
 * the TSC offset; the table stops serving (L2 runs). */
static int vmx_resume_l2(vmlab_vcpu *v, void *uc, vmlab_regs *r, vmlab_vmx_shadow *s)
{
    uint64_t img[VMLAB_LV_N];
    memcpy(img, s->l2_img, sizeof img);
    if (s->rip_k < VMLAB_VMX_SHADOW_MAX && s->rsp_k < VMLAB_VMX_SHADOW_MAX) {
        img[VMLAB_LV_RIP] = s->value[s->rip_k];
        img[VMLAB_LV_RSP] = s->value[s->rsp_k];
    }
    int err = level_load_fresh(v, uc, r, img);      /* r: read when the run stopped at the VMRESUME */
    if (err)
        return err;
    const uint32_t on = s->ept_enabled ? 1 : 0;
    if (on != (v->ept_enabled ? 1u : 0u) || (on && v->eptp != s->eptp)) {
        v->eptp = on ? s->eptp : 0;
        v->ept_enabled = on;
        vmlab_stlb_flush(v);
        vmlab_tlb_flush(uc);
    }
    v->tsc_offset = s->tsc_offset;
    s->active = 0;
    s->entered = 1;
    s->in_l2 = 1;
    s->entries++;
    return 0;
}

/* ---- VM exits of L2 reflected to L1 without leaving C ----------------------------
 * An L2 VM exit the fast path decided (f: reason, length, qualification;
 * SDM Vol. 3C 26.1-26.2 under L2's controls) after a VMRESUME executed here
 * is what vmm/nested.py _reflect does with it, when Python armed it
 * (reflect_ready: no recorder, exit log or break-exit, no VM-exit MSR-store/
 * MSR-load or VM-entry MSR-load area, the exit goes to L1's default reflection,
 * L1's trap kinds already armed, the host-state image built): 28.2 the
 * exit-information fields, 28.3 "Saving Guest State" into the image and the
 * table, 28.5 "Loading Host State" from host_img (vmlab_level_load), then L1
 * runs on at HOST_RIP with the table serving its VMREAD/VMWRITE and its
 * VMRESUME armed again -- the conditions Python checked for it hold as they
 * did, since nothing but this exit and the table changed the VMCS.  Left to
 * Python: NMIs blocked (the IRET trap is armed exactly then), and an EFER
 * other than the one host_img was built for ("load IA32_EFER" clear: the
 * host's EFER comes from L2's, 28.5.1).  Twins: vmm/nested_shadow.py
 * reflect_ok, reflect_store. */
int vmlab_vmx_reflect_ok(const vmlab_regs *r, uint32_t trap_kinds, const vmlab_vmx_shadow *s)
{
    if (!s->reflect_ready || !s->in_l2 || s->active)
        return 0;
    if (trap_kinds & (1u << VMLAB_TRAP_IRET))
        return 0;
    return r->efer == s->host_efer;
}

void vmlab_vmx_reflect_store(const vmlab_regs *r, const vmlab_fastpath *f, vmlab_vmx_shadow *s)
{
    const uint32_t count = s->n < VMLAB_VMX_SHADOW_MAX ? s->n : VMLAB_VMX_SHADOW_MAX;
    /* 28.3: the guest-state area (the fields the table holds are read from
     * it; the others are served from the VMCS area, stored there too) */
    vmlab_level_save(r, s->l2_img);
    if (s->vmcs)
        vmlab_vmcs_store_guest(r, s->vmcs, 0);
    for (int k = 0; k < VMLAB_LV_N; k++)
        if (s->img_k[k] < count)
            s->value[s->img_k[k]] = s->l2_img[k];
    /* Table 25-3 bit 3, blocking by NMI: NMIs were unblocked (vmlab_vmx_reflect_ok) */
    if (s->intr_k < count)
        s->value[s->intr_k] &= ~8ull;
    /* 28.2.1 exit reason and qualification, 28.2.5 instruction length; no
     * interruption or IDT-vectoring information */
    const uint64_t x[5] = {f->exit_reason, f->exit_qual, f->exit_len, 0, 0};
    for (int i = 0; i < 5; i++)
        if (s->x_k[i] < count)
            s->value[s->x_k[i]] = x[i];
    s->dirty = 0;
    s->active = 1;
    s->entry_ready = 1;
    s->in_l2 = 0;
    s->entered = 1;
    s->reflections++;
    s->reflected_total++;
}

/* The reflection itself: the store above, then host state with EPT off and
 * no TSC offset (root operation has neither). */
static int vmx_reflect_l2(vmlab_vcpu *v, void *uc, vmlab_regs *r, const vmlab_fastpath *f,
                          vmlab_vmx_shadow *s)
{
    vmlab_vmx_reflect_store(r, f, s);
    if (v->ept_enabled) {
        v->eptp = 0;
        v->ept_enabled = 0;
        vmlab_stlb_flush(v);
        vmlab_tlb_flush(uc);
    }
    v->tsc_offset = 0;
    return level_load_fresh(v, uc, r, s->host_img);  /* r: read when the run stopped at the exit */
}

int vmlab_run_exit_vmx(vmlab_vcpu *v, void *uc, uint64_t deadline, uint32_t flags, vmlab_regs *r,
                       vmlab_fastpath *f, vmlab_vmx_shadow *s, int *err)
{
    for (;;) {
        const int kind = vmlab_run_exit(v, uc, deadline, flags, r, f, err);
        /* An exception exit (reason 0) carries interruption information that
         * vmlab_vmx_reflect_store does not store: reflected in Python. */
        if (kind == VMLAB_STOP_FAST_EXIT && f == s->l2_fastpath && f->exit_reason != 0
            && vmlab_vmx_reflect_ok(r, v->trap_kinds, s)) {
            if (vmx_reflect_l2(v, uc, r, f, s))
                return -1;
            f = NULL;                      /* L1 runs without a fast-path policy (no VMX over it) */
            if (v->icount >= deadline)
                return VMLAB_STOP_DEADLINE;
            continue;
        }
        if (kind != VMLAB_STOP_TRAP || *err || !s->active)
            return kind;
        /* 64-bit mode at CPL 0 (so CR0.PE = 1, RFLAGS.VM = 0, CS.L = 1), CR4.VMXE,
         * no interrupt shadow or single-step trap to complete: else Python. */
        if ((r->hflags & (SH_HF_CS64 | SH_HF_CPL | SH_HF_INHIBIT_IRQ)) != SH_HF_CS64 ||
            (r->rflags & SH_RFLAGS_TF) || !(r->cr4 & SH_CR4_VMXE) || v->fault_vaddr != r->rip)
            return kind;
        const uint64_t pa = v->fault_paddr;
        if (pa == ~0ull || pa >= v->ram_size)
            return kind;
        uint32_t nb = 4096 - (uint32_t)(pa & 0xfff);
        if (nb > 15) nb = 15;
        if (pa + nb > v->ram_size) nb = (uint32_t)(v->ram_size - pa);
        uint64_t before[16];
        memcpy(before, r->gpr, sizeof before);
        const int len = vmlab_vmx_shadow_insn(v->ram + pa, nb, r->gpr, &r->rflags, s);
        if (!len) {
            if (!vmlab_vmx_resume_ok(v->ram + pa, nb, v->irq_window, v->trap_kinds, s))
                return kind;
            if (vmx_resume_l2(v, uc, r, s))
                return -1;
            f = s->l2_fastpath;
            if (v->icount >= deadline)
                return VMLAB_STOP_DEADLINE;
            continue;
        }
        r->rip += (uint64_t)len;
        /* RIP (bit 16), RFLAGS (bit 17) and the GPR a VMREAD wrote, of vmlab_regs_write */
        uint64_t mask = (1ull << 16) | (1ull << 17);
        for (int k = 0; k < 16; k++)
            if (r->gpr[k] != before[k])
                mask |= 1ull << k;
        if (vmlab_regs_write(v, uc, r, mask))
            return -1;
        if (v->icount >= deadline)
            return VMLAB_STOP_DEADLINE;
    }
}

/* ---- the L1<->L2 level switch in bulk (vmlab.h VMLAB_LV_*) -------------------------
 * A VM exit stores the guest state into the VMCS (SDM Vol. 3C 28.3) and loads
 * the host state (28.5); a VM entry loads the guest state (27.3.2 "Loading
 * Guest State").  vmm/nested.py moves the fields between the
 * VMCS and an image of VMLAB_LV_N values in Python (one list, one dict update);
 * these routines move the image into or out of the vCPU in one call each.
 * Python twin: vmm/nested_state.py (tests compare the two). */
#define LV_DESC_P (1u << 15)
#define LV_DESC_DPL_SHIFT 13
#define LV_DESC_L (1u << 21)
#define LV_DESC_B (1u << 22)
#define LV_HF_CPL 3u
#define LV_HF_CS32 (1u << 4)
#define LV_HF_SS32 (1u << 5)
#define LV_HF_ADDSEG (1u << 6)
#define LV_HF_LMA (1u << 14)
#define LV_HF_CS64 (1u << 15)
#define LV_HF_SEG_BITS (LV_HF_CPL | LV_HF_CS32 | LV_HF_SS32 | LV_HF_ADDSEG | LV_HF_CS64)
#define LV_CR0_PE 1ull
#define LV_CR0_PG (1ull << 31)
#define LV_EFER_LMA (1ull << 10)
#define LV_RFLAGS_VM (1ull << 17)

static const vmlab_seg *lv_seg_c(const vmlab_regs *r, int k)
{
    return k < 6 ? &r->seg[k] : k == 6 ? &r->ldtr : &r->tr;
}

/* QEMU SegmentCache.flags -> VMX access rights (vmm/vmx.py flags_to_ar): type,
 * S, DPL, P in bits 7:0, AVL, L, D/B, G in 15:12; unusable (bit 16) when not
 * present, or a null selector with no attributes other than for CS and TR. */
static uint64_t lv_flags_to_ar(uint32_t flags, uint32_t selector, int cs_or_tr)
{
    uint64_t ar = ((flags >> 8) & 0xFF) | ((flags >> 8) & 0xF000);
    if (!(flags & LV_DESC_P) || ((selector & ~3u) == 0 && !cs_or_tr && !ar))
        ar |= 1ull << 16;
    return ar;
}

/* VMX access rights -> SegmentCache.flags (vmm/vmx.py ar_to_flags). */
static uint32_t lv_ar_to_flags(uint64_t ar)
{
    if (ar & (1ull << 16))
        return 0;
    return (uint32_t)(((ar & 0xFF) << 8) | ((ar & 0xF000) << 8));
}

void vmlab_level_save(const vmlab_regs *r, uint64_t *img)
{
    img[VMLAB_LV_RIP] = r->rip;
    img[VMLAB_LV_RSP] = r->gpr[4];
    img[VMLAB_LV_RFLAGS] = r->rflags;
    img[VMLAB_LV_CR0] = r->cr0;
    img[VMLAB_LV_CR3] = r->cr3;
    img[VMLAB_LV_CR4] = r->cr4;
    img[VMLAB_LV_EFER] = r->efer;
    for (int k = 0; k < 8; k++) {
        const vmlab_seg *s = lv_seg_c(r, k);
        uint64_t *o = img + VMLAB_LV_SEG + 4 * k;
        o[0] = s->selector;
        o[1] = s->base;
        o[2] = s->limit;
        o[3] = lv_flags_to_ar(s->flags, s->selector, k == 1 || k == 7);
    }
    img[VMLAB_LV_GDTR_BASE] = r->gdtr_base;
    img[VMLAB_LV_GDTR_LIMIT] = r->gdtr_limit;
    img[VMLAB_LV_IDTR_BASE] = r->idtr_base;
    img[VMLAB_LV_IDTR_LIMIT] = r->idtr_limit;
}

void vmlab_level_compose(vmlab_regs *r, const uint64_t *img)
{
    r->rip = img[VMLAB_LV_RIP];
    r->gpr[4] = img[VMLAB_LV_RSP];
    r->rflags = (img[VMLAB_LV_RFLAGS] | 2) & 0x3F7FD7;       /* Vcpu.set_rflags */
    for (int k = 0; k < 8; k++) {
        vmlab_seg *s = k < 6 ? &r->seg[k] : k == 6 ? &r->ldtr : &r->tr;
        const uint64_t *in = img + VMLAB_LV_SEG + 4 * k;
        s->selector = (uint32_t)in[0];
        s->base = in[1];
        s->limit = (uint32_t)in[2];
        s->flags = lv_ar_to_flags(in[3]);
    }
    r->gdtr_base = img[VMLAB_LV_GDTR_BASE];
    r->gdtr_limit = (uint32_t)img[VMLAB_LV_GDTR_LIMIT];
    r->idtr_base = img[VMLAB_LV_IDTR_BASE];
    r->idtr_limit = (uint32_t)img[VMLAB_LV_IDTR_LIMIT];
    /* The segment-derived hflags, as cpu_x86_load_seg_cache computes them
     * (emu/cpu.py compute_hflags). */
    const vmlab_seg *cs = &r->seg[1], *ss = &r->seg[2];
    uint32_t hf = r->hflags & ~LV_HF_SEG_BITS;
    uint32_t cpl;
    if (!(r->cr0 & LV_CR0_PE))
        cpl = 0;
    else if (r->rflags & LV_RFLAGS_VM)
        cpl = 3;
    else
        cpl = (ss->flags >> LV_DESC_DPL_SHIFT) & 3;
    hf |= cpl;
    if ((r->hflags & LV_HF_LMA) && (cs->flags & LV_DESC_L)) {
        hf |= LV_HF_CS32 | LV_HF_SS32 | LV_HF_CS64;
    } else {
        if (cs->flags & LV_DESC_B)
            hf |= LV_HF_CS32;
        if (ss->flags & LV_DESC_B)
            hf |= LV_HF_SS32;
        if (!(r->cr0 & LV_CR0_PE) || (r->rflags & LV_RFLAGS_VM) || !(hf & LV_HF_CS32))
            hf |= LV_HF_ADDSEG;
        else if (r->seg[3].base | r->seg[0].base | r->seg[2].base)
            hf |= LV_HF_ADDSEG;
    }
    r->hflags = hf;
}

/* vmlab_level_load on a register file r the caller knows is the vCPU's
 * (read at the stop, nothing written since but through it). */
static int level_load_fresh(vmlab_vcpu *v, void *uc, vmlab_regs *r, const uint64_t *img)
{
    int err;
    const uint64_t cr0 = img[VMLAB_LV_CR0], cr3 = img[VMLAB_LV_CR3], cr4 = img[VMLAB_LV_CR4];
    const uint64_t efer = img[VMLAB_LV_EFER];
    /* vmm/vmx.py load_paging_state: nothing is written when the four hold those
     * values already (EFER.LMA is the CPU's, not compared). */
    if (r->cr0 != cr0 || r->cr3 != cr3 || r->cr4 != cr4 || (r->efer & ~LV_EFER_LMA) != (efer & ~LV_EFER_LMA)) {
        if ((err = vmlab_paging_write(v, uc, cr0, cr3, cr4, efer)))
            return err;
        if ((err = vmlab_regs_read(v, uc, r)))      /* PE, PG, LMA changed hflags */
            return err;
    }
    vmlab_level_compose(r, img);
    /* RSP (bit 4), RIP (16), RFLAGS (17), GDTR (22), IDTR (23) of vmlab_regs_write */
    if ((err = vmlab_regs_write(v, uc, r, (1ull << 4) | (1ull << 16) | (1ull << 17) | (1ull << 22) | (1ull << 23))))
        return err;
    return vmlab_env_set_segs(v, uc, r, 0xFF, 0xFFFFFFFFu, r->hflags, 1);
}

int vmlab_level_load(vmlab_vcpu *v, void *uc, vmlab_regs *r, const uint64_t *img)
{
    int err;
    if ((err = vmlab_regs_read(v, uc, r)))
        return err;
    return level_load_fresh(v, uc, r, img);
}
