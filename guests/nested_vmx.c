/* A small hypervisor (L1) that runs its own guest (L2) with the VMX
 * instructions, on vmlab's guest-visible VMX (vmm/nested.py).  ELF64, entered
 * in long mode on the loader's identity page tables.  It reports PASS/FAIL
 * lines on COM1 and ends through isa-debug-exit (status 0 = all passed).
 *
 * vmlab-target: elf64 (tools/cguest.py builds it so: vmlab run -cpu broadwell,+vmx guests/nested_vmx.c)
 * Build: gcc -m64 -O1 -ffreestanding -nostdlib -static -fno-pie -no-pie
 *        -mno-red-zone -mgeneral-regs-only -fno-asynchronous-unwind-tables
 *        -Wl,-Ttext=0x200000 -e _start -o nested_vmx.elf nested_vmx.c
 *
 * What it checks (SDM Vol. 3C ch. 24-31):
 *  - discovery: CPUID.1:ECX.VMX, IA32_VMX_BASIC's revision identifier;
 *  - VMXON/VMCLEAR/VMPTRLD/VMPTRST and the VMfail conventions: VMREAD of an
 *    unsupported field is VMfailValid(12), VMLAUNCH of a launched VMCS is
 *    VMfailValid(4), VMPTRLD of the VMXON region VMfailValid(10);
 *  - L2 exits with the SDM's reason, instruction length and qualification:
 *    CPUID (10), HLT (12), OUT (30, Table 28-5), RDMSR (31), VMCALL (18);
 *  - L2 under L1's EPT: a load from an unmapped guest-physical address is an
 *    EPT violation (48) with the Table 28-7 qualification and both addresses;
 *  - event injection: L1 injects external interrupt 0x30, L2's IDT handler runs;
 *  - a VM entry with invalid guest state: exit reason 33 with bit 31 (27.8);
 *  - VMRESUME after advancing GUEST_RIP; L2's registers reach L1 unchanged;
 *  - CR0/CR4 fixed bits in VMX operation (24.8, A.7-A.8): MOV to CR4 clearing
 *    VMXE and MOV to CR0 clearing NE are #GP(0) after VMXON, fine after VMXOFF;
 *  - the MSR areas (25.7.2, 25.8.2): the VM-entry MSR-load area gives L2 its
 *    IA32_KERNEL_GS_BASE (27.4), the VM-exit MSR-store area records it (28.4),
 *    the VM-exit MSR-load area gives L1 its own back (28.6); an entry that
 *    may not be loaded (IA32_FS_BASE, an x2APIC MSR, reserved bits 63:32)
 *    fails the VM entry with exit reason 34 | bit 31 and the entry's number
 *    (from 1) as exit qualification (27.8), with the VM-exit MSR-load area
 *    loaded and nothing stored;
 *  - task switches (26.4.2): a 32-bit L2 (unrestricted guest, paging off) runs a
 *    far JMP to its own code segment without an exit, then a far JMP to a TSS
 *    and a far CALL through a task gate each exit with reason 9, the Table
 *    28-2 qualification (TSS selector, source 2 JMP / 0 CALL) and the
 *    instruction length, with L2's task state unswitched; so does an INT n
 *    through a task gate in L2's IDT (source 3, the IDT-vectoring information
 *    of the software interrupt, 28.2.4) and an IRET with RFLAGS.NT = 1 back to
 *    the busy task in the back link (source 1).
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static void putc(char c) { while (!(inb(0x3fd) & 0x20)) {} outb(0x3f8, (u8)c); }
static void puts(const char *s) { while (*s) putc(*s++); }
static void puthex(u64 v) { puts("0x"); for (int i = 60; i >= 0; i -= 4) putc("0123456789abcdef"[(v >> i) & 15]); }

static int fails;
static void check(int ok, const char *what, u64 got) {
    puts(ok ? "PASS: " : "FAIL: "); puts(what);
    if (!ok) { puts(" got="); puthex(got); fails++; }
    putc('\n');
}
static __attribute__((noreturn)) void finish(void) {
    puts("DONE\n");
    outb(0xf4, fails ? 1 : 0);
    for (;;) __asm__ volatile("cli; hlt");
}

static inline u64 rdmsr(u32 msr) { u32 lo, hi; __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); return ((u64)hi << 32) | lo; }
static inline void wrmsr(u32 msr, u64 v) { __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32))); }

/* RFLAGS after a VMX instruction: CF = VMfailInvalid, ZF = VMfailValid. */
#define VMX_OK 0
#define VMX_FAIL_INVALID 1
#define VMX_FAIL_VALID 2
static inline int vmx_status(u64 rflags) { return (rflags & 1) ? VMX_FAIL_INVALID : (rflags & 0x40) ? VMX_FAIL_VALID : VMX_OK; }

static int vmxon(u64 *pa) { u64 f; __asm__ volatile("vmxon %1; pushfq; popq %0" : "=r"(f) : "m"(*pa) : "cc", "memory"); return vmx_status(f); }
static int vmclear(u64 *pa) { u64 f; __asm__ volatile("vmclear %1; pushfq; popq %0" : "=r"(f) : "m"(*pa) : "cc", "memory"); return vmx_status(f); }
static int vmptrld(u64 *pa) { u64 f; __asm__ volatile("vmptrld %1; pushfq; popq %0" : "=r"(f) : "m"(*pa) : "cc", "memory"); return vmx_status(f); }
static int vmptrst(u64 *pa) { u64 f; __asm__ volatile("vmptrst %1; pushfq; popq %0" : "=r"(f), "=m"(*pa) :: "cc", "memory"); return vmx_status(f); }
static int vmwrite(u64 field, u64 value) { u64 f; __asm__ volatile("vmwrite %2, %1; pushfq; popq %0" : "=r"(f) : "r"(field), "r"(value) : "cc"); return vmx_status(f); }
static u64 vmread(u64 field) { u64 v = 0; __asm__ volatile("vmread %1, %0" : "=r"(v) : "r"(field) : "cc"); return v; }
static int vmread_status(u64 field, u64 *out) { u64 f, v = 0; __asm__ volatile("vmread %2, %1; pushfq; popq %0" : "=r"(f), "=r"(v) : "r"(field) : "cc"); *out = v; return vmx_status(f); }

/* VMCS field encodings (SDM Vol. 3C Appendix B) */
enum {
    GUEST_ES_SELECTOR = 0x800, GUEST_CS_SELECTOR = 0x802, GUEST_SS_SELECTOR = 0x804, GUEST_DS_SELECTOR = 0x806,
    GUEST_FS_SELECTOR = 0x808, GUEST_GS_SELECTOR = 0x80a, GUEST_LDTR_SELECTOR = 0x80c, GUEST_TR_SELECTOR = 0x80e,
    HOST_ES_SELECTOR = 0xc00, HOST_CS_SELECTOR = 0xc02, HOST_SS_SELECTOR = 0xc04, HOST_DS_SELECTOR = 0xc06,
    HOST_FS_SELECTOR = 0xc08, HOST_GS_SELECTOR = 0xc0a, HOST_TR_SELECTOR = 0xc0c,
    EPT_POINTER = 0x201a, GUEST_PHYSICAL_ADDRESS = 0x2400,
    VMCS_LINK_POINTER = 0x2800, GUEST_IA32_EFER = 0x2806,
    PIN_BASED = 0x4000, PROC_BASED = 0x4002, EXCEPTION_BITMAP = 0x4004, CR3_TARGET_COUNT = 0x400a,
    EXIT_MSR_STORE_ADDR = 0x2006, EXIT_MSR_LOAD_ADDR = 0x2008, ENTRY_MSR_LOAD_ADDR = 0x200a,
    EXIT_CONTROLS = 0x400c, EXIT_MSR_STORE_COUNT = 0x400e, EXIT_MSR_LOAD_COUNT = 0x4010,
    ENTRY_CONTROLS = 0x4012, ENTRY_MSR_LOAD_COUNT = 0x4014, ENTRY_INTR_INFO = 0x4016,
    VM_INSTRUCTION_ERROR = 0x4400, EXIT_REASON = 0x4402, EXIT_INTR_INFO = 0x4404, EXIT_INTR_ERROR_CODE = 0x4406,
    EXIT_INSTRUCTION_LEN = 0x440c, IDT_VECTORING_INFO = 0x4408,
    GUEST_ES_LIMIT = 0x4800, GUEST_CS_LIMIT = 0x4802, GUEST_SS_LIMIT = 0x4804, GUEST_DS_LIMIT = 0x4806,
    GUEST_FS_LIMIT = 0x4808, GUEST_GS_LIMIT = 0x480a, GUEST_LDTR_LIMIT = 0x480c, GUEST_TR_LIMIT = 0x480e,
    GUEST_GDTR_LIMIT = 0x4810, GUEST_IDTR_LIMIT = 0x4812,
    GUEST_ES_AR = 0x4814, GUEST_CS_AR = 0x4816, GUEST_SS_AR = 0x4818, GUEST_DS_AR = 0x481a,
    GUEST_FS_AR = 0x481c, GUEST_GS_AR = 0x481e, GUEST_LDTR_AR = 0x4820, GUEST_TR_AR = 0x4822,
    GUEST_INTERRUPTIBILITY = 0x4824, GUEST_ACTIVITY = 0x4826, HOST_SYSENTER_CS = 0x4c00,
    SECONDARY_BASED = 0x401e, EXIT_QUALIFICATION = 0x6400, GUEST_LINEAR_ADDRESS = 0x640a,
    GUEST_CR0 = 0x6800, GUEST_CR3 = 0x6802, GUEST_CR4 = 0x6804,
    GUEST_ES_BASE = 0x6806, GUEST_CS_BASE = 0x6808, GUEST_SS_BASE = 0x680a, GUEST_DS_BASE = 0x680c,
    GUEST_FS_BASE = 0x680e, GUEST_GS_BASE = 0x6810, GUEST_LDTR_BASE = 0x6812, GUEST_TR_BASE = 0x6814,
    GUEST_GDTR_BASE = 0x6816, GUEST_IDTR_BASE = 0x6818, GUEST_DR7 = 0x681a, GUEST_RSP = 0x681c,
    GUEST_RIP = 0x681e, GUEST_RFLAGS = 0x6820, GUEST_PENDING_DBG = 0x6822,
    GUEST_SYSENTER_ESP = 0x6824, GUEST_SYSENTER_EIP = 0x6826,
    HOST_CR0 = 0x6c00, HOST_CR3 = 0x6c02, HOST_CR4 = 0x6c04, HOST_FS_BASE = 0x6c06, HOST_GS_BASE = 0x6c08,
    HOST_TR_BASE = 0x6c0a, HOST_GDTR_BASE = 0x6c0c, HOST_IDTR_BASE = 0x6c0e,
    HOST_SYSENTER_ESP = 0x6c10, HOST_SYSENTER_EIP = 0x6c12, HOST_RSP = 0x6c14, HOST_RIP = 0x6c16,
};

/* Controls (SDM Vol. 3C 25.6, 25.7, 25.8) */
#define PROC_HLT_EXITING (1u << 7)
#define PROC_UNCOND_IO (1u << 24)
#define PROC_SECONDARY (1u << 31)
#define PROC2_ENABLE_EPT (1u << 1)
#define PROC2_UNRESTRICTED (1u << 7)
#define EXIT_HOST_64 (1u << 9)
#define ENTRY_IA32E_GUEST (1u << 9)

/* allowed-0 settings in bits 31:0 must be 1, allowed-1 in 63:32 may be 1 (SDM A.3) */
static u32 adjust(u32 want, u32 msr) { u64 cap = rdmsr(msr); return (want | (u32)cap) & (u32)(cap >> 32); }

/* Our own GDT with a 64-bit TSS (the host TR selector must not be 0, SDM 26.2.3). */
static u64 gdt[10] __attribute__((aligned(16)));
/* L2's 32-bit tasks (SDM Vol. 3A Figure 8-2): the one TR names, the one the far JMP targets */
static u32 l2_tss_a[26] __attribute__((aligned(16)));
static u32 l2_tss_b[26] __attribute__((aligned(16)));
static u64 l2_idt32[64] __attribute__((aligned(16)));     /* L2's 32-bit IDT: 8-byte gates */
static u8 tss[104] __attribute__((aligned(16)));
static u8 vmxon_region[4096] __attribute__((aligned(4096)));
static u8 vmcs_region[4096] __attribute__((aligned(4096)));
static u8 host_stack[8192] __attribute__((aligned(16)));
static u8 guest_stack[4096] __attribute__((aligned(16)));
/* EPT (SDM 29.3): identity map of guest-physical [0, 1 GiB) with 2 MiB pages,
 * read/write/execute, write-back; nothing above, so 1 GiB is an EPT violation. */
static u64 ept_pml4[512] __attribute__((aligned(4096)));
static u64 ept_pdpt[512] __attribute__((aligned(4096)));
static u64 ept_pd[512] __attribute__((aligned(4096)));
static u64 l2_idt[2 * 256] __attribute__((aligned(16)));

struct dtr { u16 limit; u64 base; } __attribute__((packed));

/* With -DBENCH_LOOPS=N (vmlab bench nested), L2 first runs N CPUIDs that L1
 * handles by advancing GUEST_RIP and resuming: the cost of one L2 exit
 * handled by a guest hypervisor. */
#ifdef BENCH_LOOPS
#define STR2(x) #x
#define STR(x) STR2(x)
#define L2_BENCH "  movl $" STR(BENCH_LOOPS) ", %r12d\n9: movl $1, %eax\n  cpuid\n  decl %r12d\n  jnz 9b\n"
#else
#define L2_BENCH ""
#endif

void l2_code(void);
void l2_cpuid(void);
void l2_ept_load(void);
void l2_isr(void);
void l2_clear_vmxe(void);
void l2_mov_cr4(void);
void l2_vmcall(void);
void l2_msr_vmcall(void);
void l2_task32(void);
void l2_task_jmp(void);
void l2_task_call(void);
void l2_task_int(void);
void l2_task_iret(void);
void vmexit_entry(void);
__asm__(
    ".globl l2_code\n"
    "l2_code:\n"
    L2_BENCH
    "  subq $16, %rsp\n"
    "  sgdt (%rsp)\n"                /* no exit: descriptor-table exiting is 0 (its trap is armed for L1) */
    "  addq $16, %rsp\n"
    "  movl $1, %eax\n"
    "  movq $0x1122334455667788, %rbx\n"
    ".globl l2_cpuid\n"
    "l2_cpuid:\n"
    "  cpuid\n"                       /* exit 10, length 2 */
    "  hlt\n"                         /* exit 12 (HLT exiting), length 1 */
    "  movb $0x5a, %al\n"
    "  outb %al, $0x80\n"             /* exit 30 (unconditional I/O exiting) */
    "  movl $0x10, %ecx\n"
    "  rdmsr\n"                       /* exit 31 (no MSR bitmaps: every RDMSR exits) */
    "  movq $0x40000000, %rbx\n"
    ".globl l2_ept_load\n"
    "l2_ept_load:\n"
    "  movl (%rbx), %eax\n"           /* exit 48: EPT violation (L1 maps no GPA at 1 GiB) */
    "1: jmp 1b\n"                     /* L1 injects vector 0x30 instead of resuming here */
    ".globl l2_isr\n"
    "l2_isr:\n"
    ".globl l2_clear_vmxe\n"
    "l2_clear_vmxe:\n"
    "  movq %cr4, %rax\n"
    "  btrq $13, %rax\n"
    ".globl l2_mov_cr4\n"
    "l2_mov_cr4:\n"
    "  movq %rax, %cr4\n"            /* CR4.VMXE fixed in VMX operation: #GP(0), bitmap bit 13: exit 0 */
    ".globl l2_vmcall\n"
    "l2_vmcall:\n"
    "  vmcall\n"                      /* exit 18, length 3 */
    "2: jmp 2b\n"
    ".globl l2_msr_vmcall\n"
    "l2_msr_vmcall:\n"
    "  vmcall\n"                      /* exit 18 with the MSR areas in use */
    "3: jmp 3b\n"
    ".code32\n"                       /* L2 in 32-bit protected mode, CS = 0x28 */
    ".globl l2_task32\n"
    "l2_task32:\n"
    "  ljmp $0x28, $4f\n"             /* a far JMP to a code segment: no task switch, no exit */
    "4: movl $0xc0ffee, %ebx\n"
    ".globl l2_task_jmp\n"
    "l2_task_jmp:\n"
    "  ljmp $0x38, $0\n"              /* to TSS 0x38: exit 9, source JMP, length 7 */
    "5: jmp 5b\n"
    ".globl l2_task_call\n"
    "l2_task_call:\n"
    "  lcall *task_gate_ptr\n"        /* through task gate 0x40 to TSS 0x38: exit 9, source CALL, length 6 */
    "6: jmp 6b\n"
    ".globl l2_task_int\n"
    "l2_task_int:\n"
    "  int $0x31\n"                   /* IDT vector 0x31 is a task gate: exit 9, source 3, length 2 */
    "7: jmp 7b\n"
    ".globl l2_task_iret\n"
    "l2_task_iret:\n"
    "  iret\n"                        /* NT = 1: back to the task in the back link: exit 9, source 1, length 1 */
    "8: jmp 8b\n"
    ".code64\n"
    ".globl vmexit_entry\n"
    "vmexit_entry:\n"                 /* HOST_RIP: RSP = HOST_RSP, GPRs are L2's */
    "  movq %rbx, l2_rbx(%rip)\n"
    "  movq %rcx, l2_rcx(%rip)\n"
    "  call l1_exit\n"
    "  testl %eax, %eax\n"
    "  jz 2f\n"
    "  vmresume\n"
    "  call vmresume_failed\n"
    "2: call finish_checks\n"
    "  call finish\n"
);

/* L1's #GP handler (vector 13): counts the fault and resumes at gp_recover. */
void gp_stub(void);
__asm__(
    ".globl gp_stub\n"
    "gp_stub:\n"
    "  addq $8, %rsp\n"              /* the error code */
    "  cmpq $0, gp_recover(%rip)\n"
    "  je unexpected_gp\n"           /* a #GP outside try_mov_cr*: report it and stop */
    "  incl gp_count(%rip)\n"
    "  pushq %rax\n"
    "  movq gp_recover(%rip), %rax\n"
    "  movq %rax, 8(%rsp)\n"         /* the saved RIP */
    "  popq %rax\n"
    "  iretq\n"
);
volatile int gp_count;
volatile u64 gp_recover;
static u64 l1_idt[2 * 256] __attribute__((aligned(16)));
static __attribute__((noreturn)) void finish(void);
void unexpected_gp(void) { check(0, "no unexpected #GP in L1", 13); finish(); }

/* MOV to CR0/CR4 with the #GP handler armed; returns the number of #GPs (0 or 1). */
static int try_mov_cr0(u64 v) {
    gp_count = 0;
    __asm__ volatile("leaq 1f(%%rip), %%rax; movq %%rax, gp_recover(%%rip); movq %0, %%cr0; 1:"
                     :: "r"(v) : "rax", "memory");
    gp_recover = 0;
    return gp_count;
}
static int try_mov_cr4(u64 v) {
    gp_count = 0;
    __asm__ volatile("leaq 1f(%%rip), %%rax; movq %%rax, gp_recover(%%rip); movq %0, %%cr4; 1:"
                     :: "r"(v) : "rax", "memory");
    gp_recover = 0;
    return gp_count;
}
static u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }

u64 l2_rbx, l2_rcx;
static u64 l2_rcx_msr(void) { return l2_rcx & 0xFFFFFFFF; }
static u64 host_rsp;
static int stage;

void finish_checks(void);

/* far pointer (offset, selector) of the far CALL through the task gate */
struct __attribute__((packed)) { u32 offset; u16 selector; } task_gate_ptr = {0, 0x40};
#define TSS_SENTINEL 0x5eed5eedu
static void l2_enter_32bit_task_test(void);

/* MSR areas (an MSR entry, SDM Vol. 3C 25.7.2: index in bits 31:0, bits 63:32 reserved, data in 127:64) */
struct msr_entry { u32 index, reserved; u64 data; };
static struct msr_entry entry_load[2] __attribute__((aligned(16)));
static struct msr_entry exit_store[1] __attribute__((aligned(16)));
static struct msr_entry exit_load[1] __attribute__((aligned(16)));
#define IA32_KERNEL_GS_BASE 0xC0000102u
#define IA32_FS_BASE 0xC0000100u
#define KGS_L1 0x00007f0011112222ull      /* L1's value before VM entry */
#define KGS_L2 0x00007f0033334444ull      /* the VM-entry MSR-load area's */
#define KGS_HOST 0x00007f0055556666ull    /* the VM-exit MSR-load area's */
#define STORE_SENTINEL 0x5a5a5a5a5a5a5a5aull

void vmresume_failed(void) {
    check(0, "VMRESUME succeeds", vmread(VM_INSTRUCTION_ERROR));
    finish();
}

/* Handles each L2 exit; returns 1 to VMRESUME, 0 when done. */
int l1_exit(void) {
#ifdef BENCH_LOOPS
    static int bench_exits;
    if (bench_exits < BENCH_LOOPS) {
        bench_exits++;
        vmwrite(GUEST_RIP, vmread(GUEST_RIP) + vmread(EXIT_INSTRUCTION_LEN));
        return 1;
    }
#endif
    u64 reason = vmread(EXIT_REASON), len = vmread(EXIT_INSTRUCTION_LEN), rip = vmread(GUEST_RIP);
    u64 qual = vmread(EXIT_QUALIFICATION);
    switch (stage++) {
    case 0:
        check(reason == 10, "L2 CPUID exits with reason 10", reason);
        check(len == 2, "CPUID exit instruction length 2", len);
        check(rip == (u64)l2_cpuid, "GUEST_RIP points at the CPUID", rip);
        check(l2_rbx == 0x1122334455667788ull, "L2's RBX reaches L1 unchanged", l2_rbx);
        break;
    case 1:
        check(reason == 12, "L2 HLT exits with reason 12 (HLT exiting)", reason);
        check(len == 1, "HLT exit instruction length 1", len);
        break;
    case 2:
        check(reason == 30, "L2 OUT exits with reason 30", reason);
        /* Table 28-5: size-1 = 0, direction OUT (bit 3 = 0), immediate (bit 6), port 0x80 */
        check(qual == ((0x80ull << 16) | 0x40), "I/O exit qualification: OUT imm8 port 0x80", qual);
        check(len == 2, "OUT imm8 exit instruction length 2", len);
        break;
    case 3:
        check(reason == 31, "L2 RDMSR exits with reason 31", reason);
        check(len == 2, "RDMSR exit instruction length 2", len);
        check(l2_rcx_msr() == 0x10, "the MSR index is L2's ECX", l2_rcx_msr());
        break;
    case 4: {
        /* EPT violation (SDM 28.2.1 Table 28-7): a data read (bit 0), the GPA
         * not readable/writable/executable (bits 5:3 = 0), linear address
         * valid (bit 7) and the access was to the final page (bit 8). */
        u64 gpa = vmread(GUEST_PHYSICAL_ADDRESS), gla = vmread(GUEST_LINEAR_ADDRESS);
        check(reason == 48, "L2 load from an unmapped GPA: EPT violation, reason 48", reason);
        check((qual & 0x1bf) == 0x181, "EPT violation qualification: read, not present, linear, final page", qual);
        check(gpa == 0x40000000ull, "EPT violation guest-physical address", gpa);
        check(gla == 0x40000000ull, "EPT violation guest-linear address", gla);
        check(rip == (u64)l2_ept_load, "GUEST_RIP at the faulting load", rip);
        /* Inject external interrupt 0x30 on the next entry (SDM 26.6: valid,
         * type 0 external interrupt, vector); L2's IDT sends it to l2_isr. */
        vmwrite(ENTRY_INTR_INFO, 0x80000030u);
        vmwrite(GUEST_RIP, rip + 2);
        /* An external interrupt is injected only into a guest with RFLAGS.IF = 1
         * (SDM 27.3.1.5); vmlab's entry checks fail the entry otherwise. */
        vmwrite(GUEST_RFLAGS, vmread(GUEST_RFLAGS) | 0x200);
        return 1;
    }
    case 5: {
        /* L2 in VMX operation too: its MOV to CR4 clearing VMXE (not owned by
         * L1's CR4 guest/host mask) is #GP(0) (SDM Vol. 3C 24.8, 26.3), which
         * the exception bitmap (bit 13) turns into exit 0 with the
         * interruption information of a hardware exception with error code. */
        u64 info = vmread(EXIT_INTR_INFO);
        check(reason == 0 && (info & 0x80000fffull) == 0x80000b0dull,
              "L2 clearing CR4.VMXE: #GP(0) exits with reason 0, vector 13, error code", info);
        check(rip == (u64)l2_mov_cr4 && vmread(EXIT_INTR_ERROR_CODE) == 0,
              "the #GP is at the MOV to CR4, error code 0", rip);
        vmwrite(GUEST_RIP, (u64)l2_vmcall);
        return 1;
    }
    case 6:
        check(reason == 18, "L2 VMCALL exits with reason 18 (from the injected interrupt's handler)", reason);
        check(rip == (u64)l2_vmcall, "the injected interrupt ran L2's handler", rip);
        check(len == 3, "VMCALL exit instruction length 3", len);
        /* Break the guest state: RFLAGS bit 1 must be 1 (SDM 27.3.1.4). */
        vmwrite(GUEST_RIP, rip + len);
        vmwrite(GUEST_RFLAGS, 0);
        return 1;
    case 7:
        /* VM-entry failure due to invalid guest state: exit reason 33 with bit 31 (SDM 27.8) */
        check(reason == 0x80000021ull, "bad guest RFLAGS: VM-entry failure, reason 33 | bit 31", reason);
        /* The MSR areas: L2 gets KGS_L2 on entry, its value is stored on exit,
         * L1 gets KGS_HOST on exit. */
        wrmsr(IA32_KERNEL_GS_BASE, KGS_L1);
        entry_load[0] = (struct msr_entry){IA32_KERNEL_GS_BASE, 0, KGS_L2};
        exit_store[0] = (struct msr_entry){IA32_KERNEL_GS_BASE, 0, STORE_SENTINEL};
        exit_load[0] = (struct msr_entry){IA32_KERNEL_GS_BASE, 0, KGS_HOST};
        vmwrite(ENTRY_MSR_LOAD_ADDR, (u64)entry_load); vmwrite(ENTRY_MSR_LOAD_COUNT, 1);
        vmwrite(EXIT_MSR_STORE_ADDR, (u64)exit_store); vmwrite(EXIT_MSR_STORE_COUNT, 1);
        vmwrite(EXIT_MSR_LOAD_ADDR, (u64)exit_load); vmwrite(EXIT_MSR_LOAD_COUNT, 1);
        vmwrite(GUEST_RFLAGS, 2);
        vmwrite(GUEST_RIP, (u64)l2_msr_vmcall);
        return 1;
    case 8:
        check(reason == 18 && rip == (u64)l2_msr_vmcall, "L2 entered with the MSR areas: VMCALL exit", reason);
        check(exit_store[0].data == KGS_L2,
              "VM-exit MSR-store area holds L2's IA32_KERNEL_GS_BASE from the VM-entry MSR-load area",
              exit_store[0].data);
        check(rdmsr(IA32_KERNEL_GS_BASE) == KGS_HOST, "VM-exit MSR-load area loaded L1's IA32_KERNEL_GS_BASE",
              rdmsr(IA32_KERNEL_GS_BASE));
        /* Entry 2 names IA32_FS_BASE, which the VM-entry MSR-load area may not
         * load (SDM 27.4): the entry fails with qualification 2, after entry 1
         * was loaded; the VM-exit MSR-load area is loaded (27.8 step 4). */
        wrmsr(IA32_KERNEL_GS_BASE, KGS_L1);
        exit_store[0].data = STORE_SENTINEL;
        entry_load[1] = (struct msr_entry){IA32_FS_BASE, 0, 0};
        vmwrite(ENTRY_MSR_LOAD_COUNT, 2);
        return 1;
    case 9:
        check(reason == 0x80000022ull, "IA32_FS_BASE in the VM-entry MSR-load area: reason 34 | bit 31", reason);
        check(qual == 2, "MSR-loading failure: exit qualification is the entry number (2)", qual);
        check(rip == (u64)l2_msr_vmcall, "failed VM entry: GUEST_RIP unmodified", rip);
        check(rdmsr(IA32_KERNEL_GS_BASE) == KGS_HOST && exit_store[0].data == STORE_SENTINEL,
              "failed VM entry: VM-exit MSR-load area loaded, nothing stored", exit_store[0].data);
        /* Reserved bits 63:32 of entry 1: fails with qualification 1. */
        entry_load[0].reserved = 1;
        vmwrite(ENTRY_MSR_LOAD_COUNT, 1);
        return 1;
    case 10:
        check(reason == 0x80000022ull && qual == 1, "MSR entry with reserved bits 63:32: reason 34, qualification 1",
              qual);
        /* An x2APIC MSR (bits 31:8 = 000008H) as entry 1. */
        entry_load[0] = (struct msr_entry){0x808, 0, 0};
        return 1;
    case 11:
        check(reason == 0x80000022ull && qual == 1, "x2APIC MSR 808H in the VM-entry MSR-load area: reason 34", qual);
        vmwrite(ENTRY_MSR_LOAD_COUNT, 0); vmwrite(EXIT_MSR_STORE_COUNT, 0); vmwrite(EXIT_MSR_LOAD_COUNT, 0);
        l2_enter_32bit_task_test();
        return 1;
    case 12:
        /* SDM Vol. 3C 26.4.2: a task switch in VMX non-root operation is a VM
         * exit; Table 28-2: bits 15:0 the TSS selector, bits 31:30 the source. */
        check(reason == 9, "32-bit L2 far JMP to a TSS: VM exit reason 9 (task switch)", reason);
        check(qual == (0x38ull | (2ull << 30)), "task-switch qualification: TSS 0x38, source 2 (JMP)", qual);
        check(len == 7 && rip == (u64)l2_task_jmp, "task switch by JMP: instruction length 7, GUEST_RIP at the JMP", len);
        check(l2_rbx == 0xc0ffee, "L2's far JMP to a code segment ran without an exit", l2_rbx);
        check(vmread(GUEST_TR_SELECTOR) == 0x30 && vmread(GUEST_CS_SELECTOR) == 0x28
              && !(gdt[7] & (1ull << 41)) && l2_tss_a[8] == TSS_SENTINEL && l2_tss_b[0] == 0,
              "no task switched: TR, CS, the new TSS's busy bit, the old TSS's EIP and the back link unchanged",
              vmread(GUEST_TR_SELECTOR));
        vmwrite(GUEST_RIP, (u64)l2_task_call);
        return 1;
    case 13:
        check(reason == 9 && qual == 0x38ull, "far CALL through task gate 0x40: reason 9, TSS 0x38, source 0 (CALL)",
              qual);
        check(len == 6 && rip == (u64)l2_task_call, "task switch by CALL: instruction length 6", len);
        l2_idt32[0x31] = (0x38ull << 16) | (0x85ull << 40);                   /* task gate -> TSS 0x38 */
        vmwrite(GUEST_IDTR_BASE, (u64)l2_idt32); vmwrite(GUEST_IDTR_LIMIT, sizeof l2_idt32 - 1);
        vmwrite(GUEST_RIP, (u64)l2_task_int);
        return 1;
    case 14: {
        u64 idt_info = vmread(IDT_VECTORING_INFO);
        check(reason == 9 && qual == (0x38ull | (3ull << 30)),
              "INT 0x31 through a task gate in L2's IDT: reason 9, TSS 0x38, source 3", qual);
        check(len == 2 && rip == (u64)l2_task_int, "task gate in the IDT: GUEST_RIP at the INT, length 2", len);
        /* SDM 28.2.4: valid (bit 31), type 4 (software interrupt), vector 0x31 */
        check(idt_info == 0x80000431ull, "IDT-vectoring information: the software interrupt 0x31", idt_info);
        /* L2 as a nested task (RFLAGS.NT = 1) whose back link is TSS 0x38, busy */
        gdt[7] |= 1ull << 41;
        l2_tss_a[0] = 0x38;
        vmwrite(GUEST_RFLAGS, 0x4002);
        vmwrite(GUEST_RIP, (u64)l2_task_iret);
        return 1;
    }
    case 15: {
        check(reason == 9 && qual == (0x38ull | (1ull << 30)) && len == 1 && rip == (u64)l2_task_iret,
              "IRET with NT = 1: reason 9, TSS 0x38 from the back link, source 1 (IRET), length 1", qual);
        check(vmread(GUEST_TR_SELECTOR) == 0x30, "IRET task switch: L2's TR unchanged", vmread(GUEST_TR_SELECTOR));
#ifdef VMX_ABORT_TEST
        /* IA32_FS_BASE in the VM-exit MSR-load area (28.6): L2's next exit is
         * a VMX abort, indicator 4 (28.7), and the machine shuts down. */
        exit_load[0] = (struct msr_entry){IA32_FS_BASE, 0, 0};
        vmwrite(EXIT_MSR_LOAD_COUNT, 1);
        puts("VMX ABORT NEXT\n");
        return 1;
#endif
        return 0;
    }
    default:
        check(0, "no unexpected exit", reason);
        return 0;
    }
    vmwrite(GUEST_RIP, rip + len);
    return 1;
}

/* Stage 11 -> 12: L2 becomes a 32-bit protected-mode guest with paging off
 * (unrestricted guest under L1's identity EPT), CS = 0x28, TR = 0x30. */
static void l2_enter_32bit_task_test(void) {
    u64 a = (u64)l2_tss_a, b = (u64)l2_tss_b;
    gdt[5] = 0x00CF9B000000FFFFull;                                          /* 32-bit code 0x28 */
    gdt[6] = 0x67 | ((a & 0xFFFFFF) << 16) | (0x8Bull << 40) | (((a >> 24) & 0xFF) << 56);   /* busy TSS 0x30 */
    gdt[7] = 0x67 | ((b & 0xFFFFFF) << 16) | (0x89ull << 40) | (((b >> 24) & 0xFF) << 56);   /* available TSS 0x38 */
    gdt[8] = (0x38ull << 16) | (0x85ull << 40);                             /* task gate 0x40 -> TSS 0x38 */
    l2_tss_a[8] = TSS_SENTINEL;                                              /* EIP field (offset 20H) */
    l2_tss_b[8] = (u32)(u64)l2_task32;                                       /* where the new task would start */
    vmwrite(ENTRY_CONTROLS, adjust(0, 0x484));                               /* not an IA-32e mode guest */
    vmwrite(SECONDARY_BASED, adjust(PROC2_ENABLE_EPT | PROC2_UNRESTRICTED, 0x48B));
    vmwrite(GUEST_CR0, 0x31); vmwrite(GUEST_CR4, 1u << 13); vmwrite(GUEST_IA32_EFER, 0);    /* PE, ET, NE; VMXE */
    vmwrite(GUEST_CS_SELECTOR, 0x28); vmwrite(GUEST_CS_AR, 0xC09B);
    vmwrite(GUEST_TR_SELECTOR, 0x30); vmwrite(GUEST_TR_BASE, a); vmwrite(GUEST_TR_AR, 0x8B);
    vmwrite(GUEST_GDTR_LIMIT, sizeof gdt - 1);
    vmwrite(GUEST_RFLAGS, 2);
    vmwrite(GUEST_RSP, (u64)(guest_stack + sizeof guest_stack));
    vmwrite(GUEST_RIP, (u64)l2_task32);
}

void l1_main(void) {
    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    check(c & (1u << 5), "CPUID.1:ECX.VMX", c);

    /* GDT: null, 64-bit code 0x08, data 0x10, TSS 0x18 (16 bytes). */
    gdt[1] = 0x00AF9B000000FFFFull;
    gdt[2] = 0x00CF93000000FFFFull;
    u64 t = (u64)tss;
    gdt[3] = 0x67 | ((t & 0xFFFFFF) << 16) | (0x89ull << 40) | (((t >> 24) & 0xFF) << 56);
    gdt[4] = t >> 32;
    struct dtr g = { sizeof gdt - 1, (u64)gdt };
    __asm__ volatile("lgdt %0" :: "m"(g));
    __asm__ volatile("pushq $0x08; leaq 1f(%%rip), %%rax; pushq %%rax; lretq; 1:\n"
                     "movw $0x10, %%ax; movw %%ax, %%ds; movw %%ax, %%es; movw %%ax, %%ss; movw %%ax, %%fs; movw %%ax, %%gs\n"
                     "movw $0x18, %%ax; ltr %%ax" ::: "rax", "memory");

    /* L1's IDT: #GP -> gp_stub (64-bit interrupt gate, selector 0x08) */
    u64 gp = (u64)gp_stub;
    l1_idt[2 * 13] = (gp & 0xFFFF) | (0x08ull << 16) | (0x8Eull << 40) | (((gp >> 16) & 0xFFFF) << 48);
    l1_idt[2 * 13 + 1] = gp >> 32;
    struct dtr li = { sizeof l1_idt - 1, (u64)l1_idt };
    __asm__ volatile("lidt %0" :: "m"(li));

    u64 basic = rdmsr(0x480);
    u32 rev = (u32)basic & 0x7FFFFFFF;
    check(rev != 0, "IA32_VMX_BASIC revision identifier", basic);
    wrmsr(0x3A, rdmsr(0x3A) | 5);                       /* lock + VMX outside SMX */
    u64 cr0, cr4;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    cr0 = (cr0 | rdmsr(0x486)) & rdmsr(0x487);          /* CR0 fixed bits (NE) */
    __asm__ volatile("mov %0, %%cr0" :: "r"(cr0));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    cr4 = ((cr4 | (1u << 13)) | rdmsr(0x488)) & rdmsr(0x489);   /* CR4.VMXE */
    __asm__ volatile("mov %0, %%cr4" :: "r"(cr4));

    *(u32 *)vmxon_region = rev;
    *(u32 *)vmcs_region = rev;
    u64 on = (u64)vmxon_region, vm = (u64)vmcs_region, cur = 0;
    check(vmxon(&on) == VMX_OK, "VMXON succeeds", 0);
    /* SDM Vol. 3C 24.8: CR4.VMXE (IA32_VMX_CR4_FIXED0 bit 13) and CR0.NE
     * (IA32_VMX_CR0_FIXED0 bit 5) are fixed to 1 in VMX operation. */
    check(try_mov_cr4(cr4 & ~(1ull << 13)) == 1 && (read_cr4() & (1u << 13)),
          "MOV to CR4 clearing VMXE in VMX operation: #GP(0), CR4 unchanged", read_cr4());
    check(try_mov_cr0(cr0 & ~(1ull << 5)) == 1 && (read_cr0() & (1u << 5)),
          "MOV to CR0 clearing NE (fixed 1) in VMX operation: #GP(0)", read_cr0());
    check(vmptrld(&on) == VMX_FAIL_INVALID, "VMPTRLD of the VMXON region with no current VMCS: VMfailInvalid", 0);
    check(vmclear(&vm) == VMX_OK, "VMCLEAR succeeds", 0);
    check(vmptrld(&vm) == VMX_OK, "VMPTRLD succeeds", 0);
    check(vmptrld(&on) == VMX_FAIL_VALID && vmread(VM_INSTRUCTION_ERROR) == 10,
          "VMPTRLD of the VMXON region: VMfailValid(10)", vmread(VM_INSTRUCTION_ERROR));
    vmptrst(&cur);
    check(cur == vm, "VMPTRST stores the current-VMCS pointer", cur);
    u64 junk;
    check(vmread_status(0xFFFFFFFFull, &junk) == VMX_FAIL_VALID && vmread(VM_INSTRUCTION_ERROR) == 12,
          "VMREAD of an unsupported field: VMfailValid(12)", vmread(VM_INSTRUCTION_ERROR));

    for (int i = 0; i < 512; i++)
        ept_pd[i] = ((u64)i << 21) | 7 | (6 << 3) | (1 << 7);        /* RWX, WB, 2 MiB page */
    ept_pdpt[0] = (u64)ept_pd | 7;
    ept_pml4[0] = (u64)ept_pdpt | 7;
    /* L2's IDT: vector 0x30 -> l2_isr (64-bit interrupt gate, selector 0x08) */
    u64 isr = (u64)l2_isr;
    l2_idt[2 * 0x30] = (isr & 0xFFFF) | (0x08ull << 16) | (0x8Eull << 40) | (((isr >> 16) & 0xFFFF) << 48);
    l2_idt[2 * 0x30 + 1] = isr >> 32;

    /* controls */
    vmwrite(PIN_BASED, adjust(0, 0x481));
    vmwrite(PROC_BASED, adjust(PROC_HLT_EXITING | PROC_UNCOND_IO | PROC_SECONDARY, 0x482));
    vmwrite(SECONDARY_BASED, adjust(PROC2_ENABLE_EPT, 0x48B));
    vmwrite(EPT_POINTER, (u64)ept_pml4 | (3 << 3) | 6);             /* 4-level walk, WB (SDM 25.6.11) */
    vmwrite(EXIT_CONTROLS, adjust(EXIT_HOST_64, 0x483));
    vmwrite(ENTRY_CONTROLS, adjust(ENTRY_IA32E_GUEST, 0x484));
    vmwrite(EXCEPTION_BITMAP, 1u << 13);                          /* #GP exits (stage 5) */
    vmwrite(CR3_TARGET_COUNT, 0);
    vmwrite(EXIT_MSR_STORE_COUNT, 0); vmwrite(EXIT_MSR_LOAD_COUNT, 0); vmwrite(ENTRY_MSR_LOAD_COUNT, 0);
    vmwrite(ENTRY_INTR_INFO, 0);
    /* host state: this CPU as it is now */
    u64 cr3;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0)); __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    struct dtr gd, id;
    __asm__ volatile("sgdt %0" : "=m"(gd)); __asm__ volatile("sidt %0" : "=m"(id));
    vmwrite(HOST_CR0, cr0); vmwrite(HOST_CR3, cr3); vmwrite(HOST_CR4, cr4);
    vmwrite(HOST_CS_SELECTOR, 0x08); vmwrite(HOST_SS_SELECTOR, 0x10); vmwrite(HOST_DS_SELECTOR, 0x10);
    vmwrite(HOST_ES_SELECTOR, 0x10); vmwrite(HOST_FS_SELECTOR, 0x10); vmwrite(HOST_GS_SELECTOR, 0x10);
    vmwrite(HOST_TR_SELECTOR, 0x18);
    vmwrite(HOST_FS_BASE, 0); vmwrite(HOST_GS_BASE, 0); vmwrite(HOST_TR_BASE, (u64)tss);
    vmwrite(HOST_GDTR_BASE, gd.base); vmwrite(HOST_IDTR_BASE, id.base);
    vmwrite(HOST_SYSENTER_CS, 0); vmwrite(HOST_SYSENTER_ESP, 0); vmwrite(HOST_SYSENTER_EIP, 0);
    host_rsp = (u64)(host_stack + sizeof host_stack);
    vmwrite(HOST_RSP, host_rsp); vmwrite(HOST_RIP, (u64)vmexit_entry);
    /* guest state: 64-bit, flat, on the same page tables */
    vmwrite(GUEST_CR0, cr0); vmwrite(GUEST_CR3, cr3); vmwrite(GUEST_CR4, cr4); vmwrite(GUEST_DR7, 0x400);
    vmwrite(GUEST_RSP, (u64)(guest_stack + sizeof guest_stack)); vmwrite(GUEST_RIP, (u64)l2_code);
    vmwrite(GUEST_RFLAGS, 2);
    vmwrite(GUEST_CS_SELECTOR, 0x08); vmwrite(GUEST_CS_BASE, 0); vmwrite(GUEST_CS_LIMIT, 0xFFFFFFFF);
    vmwrite(GUEST_CS_AR, 0xA09B);
    static const u32 sels[] = {GUEST_ES_SELECTOR, GUEST_SS_SELECTOR, GUEST_DS_SELECTOR, GUEST_FS_SELECTOR,
                               GUEST_GS_SELECTOR};
    static const u32 bases[] = {GUEST_ES_BASE, GUEST_SS_BASE, GUEST_DS_BASE, GUEST_FS_BASE, GUEST_GS_BASE};
    static const u32 limits[] = {GUEST_ES_LIMIT, GUEST_SS_LIMIT, GUEST_DS_LIMIT, GUEST_FS_LIMIT, GUEST_GS_LIMIT};
    static const u32 ars[] = {GUEST_ES_AR, GUEST_SS_AR, GUEST_DS_AR, GUEST_FS_AR, GUEST_GS_AR};
    for (int i = 0; i < 5; i++) {
        vmwrite(sels[i], 0x10); vmwrite(bases[i], 0); vmwrite(limits[i], 0xFFFFFFFF); vmwrite(ars[i], 0xC093);
    }
    vmwrite(GUEST_LDTR_SELECTOR, 0); vmwrite(GUEST_LDTR_BASE, 0); vmwrite(GUEST_LDTR_LIMIT, 0);
    vmwrite(GUEST_LDTR_AR, 0x10000);                                  /* unusable */
    vmwrite(GUEST_TR_SELECTOR, 0x18); vmwrite(GUEST_TR_BASE, (u64)tss); vmwrite(GUEST_TR_LIMIT, 0x67);
    vmwrite(GUEST_TR_AR, 0x8B);                                       /* busy 64-bit TSS */
    vmwrite(GUEST_GDTR_BASE, gd.base); vmwrite(GUEST_GDTR_LIMIT, gd.limit);
    vmwrite(GUEST_IDTR_BASE, (u64)l2_idt); vmwrite(GUEST_IDTR_LIMIT, sizeof l2_idt - 1);
    vmwrite(GUEST_IA32_EFER, rdmsr(0xC0000080));
    vmwrite(GUEST_INTERRUPTIBILITY, 0); vmwrite(GUEST_ACTIVITY, 0); vmwrite(GUEST_PENDING_DBG, 0);
    vmwrite(GUEST_SYSENTER_ESP, 0); vmwrite(GUEST_SYSENTER_EIP, 0);
    vmwrite(VMCS_LINK_POINTER, ~0ull);

    u64 f;
    __asm__ volatile("vmlaunch; pushfq; popq %0" : "=r"(f) :: "cc", "memory");
    /* Only reached if VMLAUNCH failed. */
    check(0, "VMLAUNCH enters L2", vmread(VM_INSTRUCTION_ERROR));
    finish();
}

/* After L2's VMCALL (l1_exit returned 0): the VMfail checks that need a
 * launched VMCS, then VMXOFF. */
void finish_checks(void) {
    u64 f;
    __asm__ volatile("vmlaunch; pushfq; popq %0" : "=r"(f) :: "cc", "memory");
    check(vmx_status(f) == VMX_FAIL_VALID && vmread(VM_INSTRUCTION_ERROR) == 4,
          "VMLAUNCH of a launched VMCS: VMfailValid(4)", vmread(VM_INSTRUCTION_ERROR));
    /* L1 after L2 ran: the trap sites L2 needed (CPUID, INVD) are armed in L1
     * too (vmm/nested.py shares one set); they behave as on bare metal. */
    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    check(c & (1u << 5), "L1 CPUID after L2 ran: CPUID.1:ECX.VMX", c);
    __asm__ volatile("invd" ::: "memory");
    check(1, "L1 INVD after L2 ran completes", 0);
    __asm__ volatile("vmxoff; pushfq; popq %0" : "=r"(f) :: "cc");
    check(vmx_status(f) == VMX_OK, "VMXOFF succeeds", f);
    u64 cr4 = read_cr4();
    check(try_mov_cr4(cr4 & ~(1ull << 13)) == 0 && !(read_cr4() & (1u << 13)),
          "after VMXOFF, MOV to CR4 may clear VMXE", read_cr4());
}

__asm__(
    ".globl _start\n"
    "_start:\n"
    "  leaq boot_stack_top(%rip), %rsp\n"
    "  call l1_main\n"
    "3: hlt; jmp 3b\n"
    ".bss\n"
    ".balign 16\n"
    "boot_stack: .skip 8192\n"
    "boot_stack_top:\n"
    ".text\n"
);
