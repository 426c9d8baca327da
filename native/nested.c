/* Guest-visible VMX (vmm/nested.py): L1's VMREAD/VMWRITE of its current VMCS
 * served without leaving C.
 *
 * While the guest hypervisor (L1) runs in VMX root operation with a current
 * VMCS, Python copies the fields an exit handler typically reads or writes
 * into a vmlab_vmx_shadow table (not VMCS shadowing of SDM 25.10, which is a
 * VMX feature for L1; this is vmlab's own cache).  vmlab_run_exit_vmx wraps
 * vmlab_run_exit: at a trap site that is a VMREAD or VMWRITE between
 * registers, in 64-bit mode at CPL 0, of a field in the table, it does what
 * SDM Vol. 3C 31.3 "VMREAD"/"VMWRITE" Operation says once every #UD, #GP and
 * VMfail condition is known not to hold -- the register gets the field (or
 * the field the register, truncated to the field's width), RFLAGS.CF, PF, AF,
 * ZF, SF and OF are cleared ("VMsucceed", 31.2) -- moves RIP past it and runs
 * on.  Anything else returns to Python, which syncs the table first.  The
 * Python twin is vmm/nested_shadow.py (tests compare the two). */
#include <string.h>
#include "vmlab.h"

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
    if (k == count)
        return 0;
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

int vmlab_run_exit_vmx(vmlab_vcpu *v, void *uc, uint64_t deadline, uint32_t flags, vmlab_regs *r,
                       vmlab_fastpath *f, vmlab_vmx_shadow *s, int *err)
{
    for (;;) {
        const int kind = vmlab_run_exit(v, uc, deadline, flags, r, f, err);
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
        const int len = vmlab_vmx_shadow_insn(v->ram + pa, nb, r->gpr, &r->rflags, s);
        if (!len)
            return kind;
        r->rip += (uint64_t)len;
        /* the 16 GPRs, RIP (bit 16) and RFLAGS (bit 17) of vmlab_regs_write */
        if (vmlab_regs_write(v, uc, r, 0xFFFFull | (1ull << 16) | (1ull << 17)))
            return -1;
        if (v->icount >= deadline)
            return VMLAB_STOP_DEADLINE;
    }
}
