/* The VMCS in native memory (vmm/vmcs.py Vmcs.area): a fixed layout, as Bochs
 * keeps its VMCS area, that Python and C read and write in place.
 *
 * One 64-bit slot per field, indexed by the parts of the field's encoding
 * (SDM Vol. 3C 25.11.2, "VMREAD, VMWRITE, and Encodings of VMCS Fields",
 * Table 25-21: bits 14:13 width, bits 11:10 type, bits 9:1 index):
 *
 *     slot = (width << 2 | type) << 6 | index
 *
 * Every field vmlab supports has an index of at most 38 (IA32_VMX_VMCS_ENUM
 * bits 9:1, vmm/capabilities.py), so the 16 width/type groups of 64 slots --
 * 1024 slots, 8 KiB -- hold them all.  Python twins: emu/fastpath.py
 * ``vmcs_slot`` and ``store_exit``, vmm/nested_state.py ``store_guest``;
 * tests/unit/vmx/test_vmcs_area.py compares them. */
#include "vmlab.h"

uint32_t vmlab_vmcs_slot(uint32_t encoding)
{
    return ((((encoding >> 13) & 3u) << 2 | ((encoding >> 10) & 3u)) << 6) | ((encoding >> 1) & 0x3Fu);
}

#define SLOT(enc) (((((enc) >> 13) & 3u) << 2 | (((enc) >> 10) & 3u)) << 6 | (((enc) >> 1) & 0x3Fu))

/* The guest-state fields of the level image (VMLAB_LV_*; vmm/nested_state.py
 * GUEST_IMAGE), in its order: RIP, RSP, RFLAGS, CR0, CR3, CR4, IA32_EFER;
 * selector, base, limit, access rights of ES CS SS DS FS GS LDTR TR; GDTR
 * base and limit, IDTR base and limit (SDM Vol. 3C Appendix B). */
static const uint16_t guest_image_enc[VMLAB_LV_N] = {
    0x681E, 0x681C, 0x6820, 0x6800, 0x6802, 0x6804, 0x2806,
    0x0800, 0x6806, 0x4800, 0x4814,     /* ES */
    0x0802, 0x6808, 0x4802, 0x4816,     /* CS */
    0x0804, 0x680A, 0x4804, 0x4818,     /* SS */
    0x0806, 0x680C, 0x4806, 0x481A,     /* DS */
    0x0808, 0x680E, 0x4808, 0x481C,     /* FS */
    0x080A, 0x6810, 0x480A, 0x481E,     /* GS */
    0x080C, 0x6812, 0x480C, 0x4820,     /* LDTR */
    0x080E, 0x6814, 0x480E, 0x4822,     /* TR */
    0x6816, 0x4810, 0x6818, 0x4812,     /* GDTR base, limit; IDTR base, limit */
};
enum {
    ENC_GUEST_INTERRUPTIBILITY = 0x4824,
    ENC_EXIT_REASON = 0x4402, ENC_EXIT_QUALIFICATION = 0x6400, ENC_EXIT_INSTRUCTION_LEN = 0x440C,
    ENC_EXIT_INTR_INFO = 0x4404, ENC_EXIT_INTR_ERROR_CODE = 0x4406, ENC_IDT_VECTORING_INFO = 0x4408,
};

uint32_t vmlab_vmcs_guest_image_encoding(uint32_t k)
{
    return k < VMLAB_LV_N ? guest_image_enc[k] : 0;
}

void vmlab_vmcs_store_guest(const vmlab_regs *r, uint64_t *vmcs, uint32_t nmi_blocked)
{
    uint64_t img[VMLAB_LV_N];
    vmlab_level_save(r, img);
    for (int k = 0; k < VMLAB_LV_N; k++)
        vmcs[SLOT(guest_image_enc[k])] = img[k];
    /* Table 25-3 bit 3: blocking by NMI, as at the exit (28.3.1.5) */
    uint64_t *intr = &vmcs[SLOT(ENC_GUEST_INTERRUPTIBILITY)];
    *intr = (*intr & ~8ull) | (nmi_blocked ? 8ull : 0);
}

void vmlab_vmcs_store_exit(const vmlab_fastpath *f, uint64_t *vmcs)
{
    /* 28.2.1 basic exit information: reason, qualification; 28.2.5 the
     * instruction length; 28.2.2 the interruption information (0: none) and,
     * when its bit 11 says one was delivered, the error code (the field keeps
     * its value otherwise); 28.2.3 no IDT-vectoring information (the fast
     * path decides no exit during event delivery). */
    vmcs[SLOT(ENC_EXIT_REASON)] = f->exit_reason;
    vmcs[SLOT(ENC_EXIT_QUALIFICATION)] = f->exit_qual;
    vmcs[SLOT(ENC_EXIT_INSTRUCTION_LEN)] = f->exit_len;
    vmcs[SLOT(ENC_EXIT_INTR_INFO)] = f->exit_intr_info;
    vmcs[SLOT(ENC_IDT_VECTORING_INFO)] = 0;
    if (f->exit_intr_info & 0x800)
        vmcs[SLOT(ENC_EXIT_INTR_ERROR_CODE)] = f->exit_intr_error;
}
