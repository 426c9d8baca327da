/* vmlab native fast path: shared declarations.
 *
 * This header is read twice: by the C compiler, and by native/build.py, which
 * strips every line starting with '#' and hands the rest to cffi's cdef().  So
 * keep it to plain struct/function declarations and integer constants in enums.
 *
 * Nothing here links against libunicorn: Python hands over the Unicorn entry
 * points as raw pointers (vmlab_set_api) taken from the library the binding
 * already loaded (see docs/platform-notes.md, "Building the native module").
 */
#ifndef VMLAB_H
#define VMLAB_H
#include <stdint.h>

/* Access kinds, encoded like the #PF error code (SDM Vol. 3A, 4.7) so that a
 * fault's error code is P | RSVD | access. */
enum {
    VMLAB_ACC_READ = 0,
    VMLAB_ACC_WRITE = 2,
    VMLAB_ACC_USER = 4,
    VMLAB_ACC_FETCH = 16,
};

/* Walk flags. */
enum {
    VMLAB_WALK_SET_AD = 1,        /* update accessed/dirty bits (a real access) */
    VMLAB_WALK_IMPLICIT_SUP = 2,  /* implicit supervisor access (GDT/IDT/TSS reads) */
    VMLAB_WALK_AC = 4,            /* EFLAGS.AC is set (SMAP override, explicit accesses) */
};

/* Result of a walk: what stopped it. */
enum {
    VMLAB_OK = 0,
    VMLAB_FAULT_PF = 1,        /* guest #PF: see error_code */
    VMLAB_FAULT_BUS = 2,       /* final physical page is not RAM (MMIO / unassigned) */
    VMLAB_FAULT_EPT_VIOLATION = 3, /* EPT violation (SDM Vol. 3C 29.3.3.2): gpa, qualification */
    VMLAB_FAULT_EPT_MISCONFIG = 4, /* EPT misconfiguration (29.3.3.1): gpa */
};

/* EPT violation exit qualification bits (SDM Vol. 3C Table 28-7). */
enum {
    VMLAB_EPTQ_READ = 1,            /* bit 0: data read */
    VMLAB_EPTQ_WRITE = 2,           /* bit 1: data write */
    VMLAB_EPTQ_FETCH = 4,           /* bit 2: instruction fetch */
    VMLAB_EPTQ_READABLE = 8,        /* bit 3: AND of bit 0 (R) of the EPT entries used */
    VMLAB_EPTQ_WRITABLE = 16,       /* bit 4: AND of bit 1 (W) */
    VMLAB_EPTQ_EXECUTABLE = 32,     /* bit 5: AND of bit 2 (X) */
    VMLAB_EPTQ_GLA_VALID = 128,     /* bit 7: the guest-linear-address field is valid */
    VMLAB_EPTQ_TRANSLATED = 256,    /* bit 8 (if bit 7): access to the final page, not to a
                                       guest paging-structure entry */
};

/* Protection bits, identical to Unicorn's uc_prot. */
enum { VMLAB_PROT_R = 1, VMLAB_PROT_W = 2, VMLAB_PROT_X = 4 };

/* Why the C side stopped Unicorn (vmlab_vcpu.stop_kind). */
enum {
    VMLAB_STOP_NONE = 0,
    VMLAB_STOP_DEADLINE = 1,   /* icount reached icount_deadline */
    VMLAB_STOP_IRQ_WINDOW = 2, /* irq_window armed and EFLAGS.IF became 1 */
    VMLAB_STOP_EXCEPTION = 3,  /* UC_HOOK_INTR: exception or INT n, see intno */
    VMLAB_STOP_PAGE_FAULT = 4, /* TLB fill failed: guest #PF (fault_* fields) */
    VMLAB_STOP_MMIO = 5,       /* TLB fill hit a non-RAM physical page (fault_* fields) */
    VMLAB_STOP_REQUEST = 6,    /* vmlab_request_stop() */
    VMLAB_STOP_TRAP = 7,       /* before an armed trap site (fault_vaddr = its linear address) */
    VMLAB_STOP_LOG_FULL = 8,   /* a registry log needs draining */
    VMLAB_STOP_NONCANONICAL = 9, /* long-mode access to a non-canonical address (#GP/#SS) */
    VMLAB_STOP_EPT_VIOLATION = 10, /* TLB fill: EPT violation (fault_ept_* fields) */
    VMLAB_STOP_EPT_MISCONFIG = 11, /* TLB fill: EPT misconfiguration (fault_ept_gpa) */
    VMLAB_STOP_TASK_SWITCH = 13, /* a fill inside a task switch Unicorn runs (emu/taskswitch.py) */
    VMLAB_STOP_SYSINSN = 12,   /* SYSCALL (intno 0) or SYSENTER (intno 1) reached; Unicorn skips
                                  them, so RIP is past it and fault_vaddr is its address */
    VMLAB_STOP_SITES = 13,     /* a block's first run armed trap sites in it: stopped before it
                                  ran, so that it is translated again with them (vmlab_run
                                  restarts by itself; never seen by Python) */
};

/* At most this many trap sites are armed at once (native/hooks.c arm_block_sites). */
enum { VMLAB_MAX_SITES = 8192 };

/* Trap-site kinds: "stop before any instruction of kind K" (bit numbers). */
enum {
    VMLAB_TRAP_RDMSR = 0, VMLAB_TRAP_WRMSR = 1, VMLAB_TRAP_CR_READ = 2,
    VMLAB_TRAP_CR_WRITE = 3, VMLAB_TRAP_CLTS = 4, VMLAB_TRAP_LMSW = 5,
    VMLAB_TRAP_INVLPG = 6, VMLAB_TRAP_HLT = 7, VMLAB_TRAP_IO = 8,
    VMLAB_TRAP_CPUID = 9, VMLAB_TRAP_RDTSC = 10, VMLAB_TRAP_RDTSCP = 11,
    VMLAB_TRAP_RDPMC = 12, VMLAB_TRAP_WBINVD = 13, VMLAB_TRAP_INVD = 14,
    VMLAB_TRAP_XSETBV = 15, VMLAB_TRAP_MWAIT = 16, VMLAB_TRAP_MONITOR = 17,
    VMLAB_TRAP_PAUSE = 18, VMLAB_TRAP_DR = 19, VMLAB_TRAP_DESC = 20,
    VMLAB_TRAP_RDRAND = 21, VMLAB_TRAP_RDSEED = 22, VMLAB_TRAP_VMX = 23,
    VMLAB_TRAP_INVPCID = 24, VMLAB_TRAP_SMSW = 25, VMLAB_TRAP_INT1 = 26, VMLAB_TRAP_IRET = 27,
    VMLAB_TRAP_TASK = 28,
    VMLAB_TRAP_COUNT = 29,
};

typedef struct vmlab_walk {
    uint64_t vaddr;
    uint64_t paddr;          /* physical address of vaddr (offset included) */
    uint64_t page_size;      /* 4 KiB, 2 MiB, 4 MiB or 1 GiB */
    uint32_t access;         /* VMLAB_ACC_* asked for */
    uint32_t perms;          /* VMLAB_PROT_* the translation grants this access's privilege */
    uint32_t fault;          /* VMLAB_OK / VMLAB_FAULT_* */
    uint32_t error_code;     /* #PF error code when fault == VMLAB_FAULT_PF */
    uint32_t levels;         /* guest paging-structure entries read */
    uint32_t dirty;          /* final entry has D=1 (or paging off) */
    uint64_t entry_addr[5];  /* (guest-)physical address of each entry read, top level first */
    uint64_t entry_val[5];   /* its value as read (before A/D updates) */
    /* ---- EPT (vmlab_vcpu.ept_enabled): paddr above is then host-physical ---- */
    uint64_t gpa;            /* EPT fault: the guest-physical address that faulted; else the
                                guest-physical address of vaddr once the guest leaf was accepted */
    uint64_t gla;            /* EPT fault of a linear walk: vaddr (Table 28-7 bit 7), else 0 */
    uint64_t ept_qualification; /* EPT violation: exit qualification (VMLAB_EPTQ_*); else 0 */
    uint64_t ept_page_size;  /* page size of the recorded EPT translation (0: no leaf reached) */
    uint32_t ept_levels;     /* EPT entries recorded: of the translation that faulted, or of
                                the final page's translation on success (0 on a guest #PF) */
    uint32_t pad;
    uint64_t ept_entry_addr[4];  /* host-physical address of each EPT entry, PML4E first */
    uint64_t ept_entry_val[4];   /* its value as read (before EPT A/D updates) */
} vmlab_walk;

typedef struct vmlab_cpuid_entry {
    uint32_t leaf, subleaf, flags, pad;   /* flags bit 0: subleaf is significant */
    uint32_t eax, ebx, ecx, edx;
} vmlab_cpuid_entry;

typedef struct vmlab_seg {
    uint32_t selector, pad;
    uint64_t base;
    uint32_t limit, flags;   /* QEMU SegmentCache.flags: descriptor bits 8..23 in place */
} vmlab_seg;

/* The register file moved in one call per exit (rule: guest state moves in bulk). */
typedef struct vmlab_regs {
    uint64_t gpr[16];        /* rax rcx rdx rbx rsp rbp rsi rdi r8..r15 (x86 encoding order) */
    uint64_t rip, rflags;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t fs_base, gs_base, kernel_gs_base;
    uint64_t gdtr_base, idtr_base;
    uint32_t gdtr_limit, idtr_limit;
    uint64_t dr[8];          /* dr0..dr3, (dr4, dr5 unused), dr6, dr7 */
    vmlab_seg seg[6];        /* es cs ss ds fs gs: full caches (from CPU state) */
    vmlab_seg ldtr, tr;
    uint32_t hflags;         /* QEMU hflags (CPL in bits 0-1, CS32 1<<4, CS64 1<<15, LMA 1<<14) */
    int32_t error_code;      /* error code of the last exception raised inside Unicorn */
    int32_t exception_is_int;/* 1: software INT n / INT3 / INTO (RIP is after it) */
    int32_t pad;
} vmlab_regs;

/* One translated block as vmlab's registry sees it (QEMU keys TBs the same way:
 * physical address, pc, and the flags that change decoding). */
typedef struct vmlab_tb {
    uint64_t pc;            /* linear address of the first instruction */
    uint64_t paddr;         /* guest-physical address of the first byte */
    uint64_t exec_count;    /* executions, counted only while count_exec is set */
    uint32_t size;          /* bytes */
    uint32_t ninsn;         /* instructions */
    uint32_t hflags;        /* decoding-relevant QEMU hflags (CPL, CS32, CS64, PE, LMA...) */
    uint32_t valid;         /* 0 once a store to its page invalidated it */
    uint32_t translations;  /* times it was (re)discovered */
    uint32_t invalidations;
    uint32_t sites_gen;     /* vmlab_vcpu.sites_gen when its trap sites were armed (0: never) */
    uint32_t pad;
} vmlab_tb;

/* ---- debugger (native/debug.c; Python side emu/debugpoints.py) --------------
 * Breakpoints are one-address UC_HOOK_CODE hooks, like trap sites: guest memory
 * is never written and code that does not run pays nothing.  Watchpoints are
 * checked by the TLB fill: a page holding a watched range is handed out without
 * the watched right, so those accesses come back through the fill (page-granular
 * cost only).  Everything here is off while vmlab_vcpu.dbg is NULL. */
enum { VMLAB_MAX_BREAKS = 64, VMLAB_MAX_HOOKED = 256, VMLAB_MAX_WATCHES = 16 };
/* Stop kinds of the debugger (vmlab_vcpu.stop_kind). */
enum {
    VMLAB_STOP_BREAK = 20,     /* before the instruction at dbg->hit_addr (a breakpoint) */
    VMLAB_STOP_WATCH = 21,     /* a fill for a watched page (dbg->hit_*); the access has not happened */
    VMLAB_STOP_DEBUG = 22,     /* at a block boundary: dbg->hit_reason (VMLAB_DBG_*) */
};
enum { VMLAB_WATCH_WRITE = 1, VMLAB_WATCH_READ = 2 };
enum { VMLAB_DBG_ASYNC = 1, VMLAB_DBG_MODE = 2 };

typedef struct vmlab_watch {
    uint64_t addr, len;
    uint32_t kinds;            /* VMLAB_WATCH_* */
    uint32_t physical;         /* 1: addr is guest-physical, else linear */
} vmlab_watch;

typedef struct vmlab_debug {
    uint64_t breaks[64];       /* linear breakpoint addresses (VMLAB_MAX_BREAKS) */
    uint64_t phys_breaks[64];  /* physical breakpoint addresses */
    uint64_t hooked[256];      /* linear addresses with a code hook (VMLAB_MAX_HOOKED) */
    uint64_t hooks[256];       /* their uc_hook handles */
    uint32_t nbreaks, nphys_breaks, nhooked;
    uint32_t suspend_breaks;   /* 1: breakpoints do not stop (stepping off one) */
    uint32_t suspend_watch;    /* 1: the fill grants every right (running the watched access) */
    uint32_t nwatch;
    vmlab_watch watch[16];     /* VMLAB_MAX_WATCHES */
    uint32_t async_stop;       /* set from another thread: stop at the next block boundary */
    uint32_t break_mode;       /* 1: stop at the first block whose mode differs from mode_state */
    uint32_t mode_state;       /* vmlab_dbg_mode() at the last stop */
    uint32_t hit_reason;       /* VMLAB_STOP_DEBUG: VMLAB_DBG_* */
    uint64_t hit_addr;         /* BREAK: linear address; WATCH: linear page of the fill */
    uint64_t hit_paddr;        /* WATCH: physical page */
    uint32_t hit_access;       /* WATCH: VMLAB_ACC_* of the access */
    uint32_t pad;
} vmlab_debug;

typedef struct vmlab_vcpu {
    /* ---- virtual time ---- */
    uint64_t icount;           /* virtual time in ns: instructions << icount_shift, counted at block entry */
    uint64_t icount_deadline;  /* block hook stops once icount >= this */
    uint64_t tsc_offset;       /* RDTSC = icount + tsc_offset */
    uint32_t tsc_aux;
    uint32_t irq_window;       /* 1: stop at the next block boundary with IF=1 */
    uint32_t icount_shift;     /* one instruction = 2^shift ns of virtual time (QEMU -icount shift=N) */
    /* Nonzero: something outside the run asks the run loop to look before the
     * next run (an NMI/INIT or interrupt line raised, a stop requested, host
     * input queued); vmlab_lean_run returns at once.  Set by Python (any
     * thread), cleared by the run loop before it looks. */
    uint32_t attention;

    /* ---- why we stopped (filled by C, cleared by Python) ---- */
    uint32_t stop_kind;
    uint32_t intno;
    uint64_t fault_vaddr;      /* page-aligned linear address of the failed fill */
    uint64_t fault_paddr;      /* physical page for MMIO stops */
    uint32_t fault_access;     /* VMLAB_ACC_* */
    uint32_t fault_error_code; /* #PF error code */

    /* ---- paging context (kept current by Python on every change) ---- */
    uint8_t *ram;              /* host address of guest-physical 0; RAM is [0, ram_size) and
                                  [VMLAB_HIGH_RAM_BASE, + ram_high), the hole between is no RAM */
    uint64_t ram_size;         /* RAM below 4 GiB, from 0 */
    uint64_t ram_high;         /* RAM from 4 GiB (emu/memory.py split_ram) */
    uint64_t cr0, cr3, cr4, efer;
    uint32_t maxphyaddr;       /* physical-address width advertised by CPUID */
    uint32_t pdpe1gb;          /* 1 GiB pages allowed (CPUID.80000001H:EDX[26]) */
    /* EPT (SDM Vol. 3C 29.3): when ept_enabled, every guest-physical address the walk
     * touches goes through the 4-level EPT rooted at eptp (bit 6: EPT A/D flags). */
    uint64_t eptp;
    uint32_t ept_enabled;
    int32_t env_cs_flags;      /* offset of segs[R_CS].flags from env (0: unknown; hooks.c task switch) */
    uint64_t fault_ept_gpa;            /* VMLAB_STOP_EPT_*: guest-physical address that faulted */
    uint64_t fault_ept_qualification;  /* VMLAB_STOP_EPT_VIOLATION: exit qualification */

    /* ---- per RAM page state for trap-site coherence ---- */
    uint8_t *page_flags;       /* ram_size/4096 bytes, VMLAB_PAGE_* */
    uint32_t *page_gen;        /* bumped when a code page is written */

    /* ---- trap sites ---- */
    uint32_t trap_kinds;       /* bitmask of 1 << VMLAB_TRAP_* */
    uint32_t sites_gen;        /* bumped when trap_kinds change: every block is classified again */
    uint64_t *exits;           /* linear addresses armed in Unicorn */
    uint32_t nexits, exits_cap;

    /* ---- CPUID model ---- */
    vmlab_cpuid_entry cpuid[96];
    uint32_t ncpuid;
    uint32_t cpuid_max_basic, cpuid_max_ext;
    uint32_t pad0;

    /* ---- the live CPUX86State (found once by emu/qemu_state.py): hflags in one load ---- */
    uint8_t *env;              /* address of regs[0] */
    int32_t env_hflags;        /* offset of hflags from env */
    int32_t pad2;

    /* ---- offsets inside a saved Unicorn context (found by the Python self-test) ---- */
    int32_t ctx_env;           /* start of CPUX86State (regs[0]) */
    int32_t ctx_hflags, ctx_segs, ctx_ldt, ctx_tr, ctx_error_code, ctx_is_int, ctx_old_exception;
    /* eip, SegmentCache gdt (idt follows), cr[5], efer, dr[8]: the bulk register
     * read takes them in place when env is known (0: through the API) */
    int32_t ctx_eip, ctx_gdt, ctx_cr, ctx_efer, ctx_dr, ctx_kernel_gs_base;

    /* ---- statistics ---- */
    uint64_t stat_fills, stat_fill_faults, stat_mmio, stat_blocks, stat_icount_misses;
    uint64_t stat_stlb_hits, stat_stlb_flushes;
    uint64_t stat_blocks_classified, stat_code_writes, stat_sites_armed;
    uint64_t stat_sites_resets;        /* times VMLAB_MAX_SITES was reached and every site dropped */

    /* ---- block registry (Python reads these arrays, drains the logs) ---- */
    vmlab_tb *tbs;
    uint32_t ntbs, tbs_cap;
    uint32_t *tb_new;          /* indices of blocks discovered since the last drain */
    uint32_t ntb_new, tb_new_cap;
    uint32_t *tb_inval;        /* indices of blocks invalidated since the last drain */
    uint32_t ntb_inval, tb_inval_cap;
    uint32_t *exec_log;        /* -d exec: block indices in execution order */
    uint32_t nexec_log, exec_log_cap;
    uint32_t count_exec;       /* 1: count executions per block (slower) */
    uint32_t log_exec;         /* 1: append every executed block to exec_log */
    uint64_t stat_tb_translations, stat_tb_invalidations;

    /* ---- MMIO instruction replay: one linear page redirected to a scratch page ---- */
    uint64_t redirect_vpage, redirect_ppage;
    uint32_t redirect_on, pad1;

    /* debugger state (native/debug.c), NULL when no debugger is attached */
    vmlab_debug *dbg;

    /* private C state */
    void *priv;
} vmlab_vcpu;

enum { VMLAB_PAGE_CODE = 1 };

/* --- debugger (native/debug.c) --- */
void vmlab_debug_set_api(void *hook_add, void *hook_del, void *emu_stop, void *ctl);
int vmlab_dbg_add_break(vmlab_vcpu *v, void *uc, uint64_t addr, int physical);
int vmlab_dbg_remove_break(vmlab_vcpu *v, void *uc, uint64_t addr, int physical);
int vmlab_dbg_break_hit(vmlab_vcpu *v, void *uc, uint64_t addr);
int vmlab_dbg_fill(vmlab_vcpu *v, void *uc, uint64_t vaddr, uint64_t ppage, uint32_t access, uint32_t *perms);
int vmlab_dbg_block(vmlab_vcpu *v, void *uc);
uint32_t vmlab_dbg_mode(vmlab_vcpu *v);
void vmlab_request_slow_path(vmlab_vcpu *v);

/* --- API --- */
int vmlab_set_api(void *hook_add, void *hook_del, void *reg_read, void *reg_write, void *reg_read_batch,
                  void *reg_write_batch, void *emu_stop, void *ctl, void *context_alloc,
                  void *context_save, void *context_restore, void *context_free,
                  void *cs_open, void *cs_disasm, void *cs_free);
int vmlab_vcpu_init(vmlab_vcpu *v, void *uc, uint8_t *ram, uint64_t ram_size, uint64_t ram_high);
/* 1 if [pa, pa + len) lies inside one RAM range (Python twin: emu/memory.py GuestMemory.contains). */
int vmlab_is_ram(const vmlab_vcpu *v, uint64_t pa, uint64_t len);
void vmlab_vcpu_fini(vmlab_vcpu *v);
int vmlab_attach(vmlab_vcpu *v, void *uc);
/* Clock modes and the run entry point (hooks.c, "clock modes"): host != 0 selects
 * host monotonic time (ns since origin_ns) instead of the instruction count. */
int vmlab_set_clock(vmlab_vcpu *v, void *uc, int host, uint64_t origin_ns);
int vmlab_run(vmlab_vcpu *v, void *uc, uint64_t begin, uint32_t flags);
uint64_t vmlab_host_now(vmlab_vcpu *v);

int vmlab_walk_do(vmlab_vcpu *v, uint64_t vaddr, uint32_t access, uint32_t flags, vmlab_walk *w);
int vmlab_ept_translate(vmlab_vcpu *v, uint64_t gpa, uint32_t access, vmlab_walk *w);
uint64_t vmlab_walk_bench(vmlab_vcpu *v, const uint64_t *vaddrs, int n, uint32_t access);

int vmlab_regs_read(vmlab_vcpu *v, void *uc, vmlab_regs *r);
int vmlab_regs_write(vmlab_vcpu *v, void *uc, const vmlab_regs *r, uint64_t mask);
int vmlab_env_set_segs(vmlab_vcpu *v, void *uc, const vmlab_regs *r, uint32_t seg_mask,
                       uint32_t hflags_mask, uint32_t hflags_val, int clear_exception);

int vmlab_trap_set_kinds(vmlab_vcpu *v, void *uc, uint32_t kinds);
int vmlab_exit_remove(vmlab_vcpu *v, void *uc, uint64_t addr);
/* The trap sites of one block: the offsets among starts[0..nstarts) (its
 * instruction starts, ascending, each < len) where an instruction of an armed
 * kind begins in mode (16, 32 or 64) code; kinds to site_kinds if not NULL.
 * Returns their number (at most max_sites).  Python twin: trapscan.block_sites. */
int vmlab_block_sites(const uint8_t *code, uint32_t len, const uint32_t *starts, uint32_t nstarts, int mode,
                      uint32_t kinds, uint32_t *sites, uint8_t *site_kinds, uint32_t max_sites);
/* sizeof(cs_insn) and the offsets of its address and size fields in the
 * Capstone the engine was built with (5.x); emu/native.py checks them against
 * the Capstone Python binding's own structure before the first VM runs. */
enum { VMLAB_CS_INSN_SIZE = 248, VMLAB_CS_INSN_ADDRESS = 8, VMLAB_CS_INSN_LEN = 16 };
void vmlab_code_page_written(vmlab_vcpu *v, uint64_t paddr);
int vmlab_phys_written(vmlab_vcpu *v, uint64_t gpa, uint64_t len);
void vmlab_tlb_flush(void *uc);
void vmlab_tb_reset(vmlab_vcpu *v);
void vmlab_stlb_flush(vmlab_vcpu *v);
void vmlab_set_emu_start(void *emu_start);
void vmlab_set_cs_close(void *cs_close);
/* Unicorn's cpu_cc_compute_all_x86_64 (QEMU's lazy condition codes -> flags). */
void vmlab_set_cc_compute_all(void *fn);
int vmlab_emu_start(void *uc, uint64_t begin);
int vmlab_emu_step(vmlab_vcpu *v, void *uc, uint64_t begin);
int vmlab_step_past_site(vmlab_vcpu *v, void *uc, uint64_t begin, uint64_t site);

/* ---- trap-site classifier (native/hooks.c; opcode table native/trap_table.h,
 * generated from emu/trapscan.py, which also holds the Python twin) ---- */
enum {
    VMLAB_CLASS_NONE = 0,      /* not an instruction of any trap kind (or longer than 15 bytes) */
    VMLAB_CLASS_TRAP = 1,      /* kind and length are valid */
    VMLAB_CLASS_TRUNCATED = 2, /* the bytes ran out first; maybe = the kinds still possible */
};
enum {
    VMLAB_PFX_LOCK = 1, VMLAB_PFX_REPNE = 2, VMLAB_PFX_REP = 4, VMLAB_PFX_OPSIZE = 8,
    VMLAB_PFX_ADSIZE = 16, VMLAB_PFX_SEG = 32, VMLAB_PFX_REX = 64,
    VMLAB_PFX_VEX = 128,     /* a VEX prefix (C4/C5) selected the opcode map: #UD */
};

typedef struct vmlab_insn {
    int32_t kind;        /* VMLAB_TRAP_* when status is VMLAB_CLASS_TRAP, else -1 */
    uint32_t status;     /* VMLAB_CLASS_* */
    uint32_t length;     /* bytes, prefixes included (VMLAB_CLASS_TRAP) */
    uint32_t nprefix;    /* prefix bytes (legacy, REX) before the opcode */
    uint32_t prefixes;   /* VMLAB_PFX_* present */
    uint32_t maybe;      /* VMLAB_CLASS_TRUNCATED: 1 << VMLAB_TRAP_* of the kinds still possible */
    uint8_t opmap;       /* 0: one-byte map, 1: 0F xx, 2: 0F 38 xx (once read) */
    uint8_t opcode;      /* opcode byte in that map */
    uint8_t modrm, has_modrm;
    uint8_t rex;         /* REX byte in effect (64-bit mode, last prefix), 0 if none */
    uint8_t seg;         /* last segment override: 0..5 = ES CS SS DS FS GS, 255 none */
    uint8_t mandatory;   /* mandatory-prefix class: 0, 0x66, 0xF3 or 0xF2 */
    uint8_t pad;
} vmlab_insn;

/* Classify the instruction at code[0..len) in 16-, 32- or 64-bit code (mode);
 * returns out->kind. */
int vmlab_classify(const uint8_t *code, uint32_t len, int mode, vmlab_insn *out);

/* ---- VM-exit fast path (native/hooks.c, "fast path"; Python twin emu/fastpath.py) ----
 * At a trap site, decide in C whether the instruction is a VM exit that needs
 * nothing but its reason, length and qualification -- the policy-only exits of
 * SDM Vol. 3C 26.1: CPUID, HLT, RDTSC... by control, IN/OUT (not string) by
 * unconditional I/O exiting or the I/O bitmaps, RDMSR/WRMSR by the MSR bitmaps
 * (26.1.3).  The VMM fills the
 * policy at VM entry; Python then skips decoding the site. */
typedef struct vmlab_fastpath {
    uint32_t exit_kinds;       /* 1 << VMLAB_TRAP_*: every instance VM-exits with qualification 0 */
    uint32_t io_mode;          /* VMLAB_FAST_IO_* */
    uint64_t io_bitmap_a;      /* guest-physical address of I/O bitmap A (ports 0000-7FFF) */
    uint64_t io_bitmap_b;      /* ... and B (ports 8000-FFFF) */
    uint32_t msr_mode;         /* VMLAB_FAST_MSR_*: how RDMSR/WRMSR exit (SDM Vol. 3C 26.1.3) */
    uint32_t pad_msr;
    uint64_t msr_bitmap;       /* guest-physical address of the 4 KiB MSR bitmaps (25.6.9) */
    uint16_t reason[29];       /* basic exit reason by trap kind (VMLAB_TRAP_COUNT entries) */
    uint16_t pad_reason[3];
    /* MOV to/from CR (SDM Vol. 3C 26.1.3), decided when cr_mode is 1: MOV to
     * CR0/CR4 exits if a bit set in the guest/host mask differs between the
     * source and the read shadow; MOV to CR3 with CR3-load exiting unless the
     * source equals one of the first CR3-target-count target values; MOV
     * from CR3 with CR3-store exiting; MOV to/from CR8 with CR8-load/-store
     * exiting.  (CLTS and LMSW are left to Python.) */
    uint32_t cr_mode;
    uint32_t cr_ctl;           /* VMLAB_CR3_LOAD ... */
    uint64_t cr0_mask, cr0_shadow, cr4_mask, cr4_shadow;
    uint32_t cr3_count;        /* CR3-target count (only the first 4 values are used) */
    uint32_t cr_emulate;       /* 1: a MOV to/from CR0/CR3/CR4 that does not VM-exit is completed in C
                                  when it can be (vmlab_cr_value) and the run goes on */
    uint64_t cr3_target[4];
    uint64_t cr4_valid;        /* CR4 bits the CPU model accepts (others: #GP, left to Python) */
    uint32_t maxphyaddr;       /* physical-address width (CR3 in IA-32e mode) */
    uint32_t pad_cr2;
    /* Exceptions (SDM Vol. 3C 26.2, 25.6.3), decided when exc_mode is 1: an
     * exception the guest's code raised (vmlab_fast_decide_exc) VM-exits if
     * its bit in the exception bitmap is 1 -- for #PF, if the bit is 1 and
     * (error code AND mask) = match, or the bit is 0 and they differ. */
    uint32_t exc_mode;
    uint32_t exc_bitmap;
    uint32_t pf_mask, pf_match;
    /* ---- the decision (out) ---- */
    uint32_t exit_reason;
    uint32_t exit_len;
    uint64_t exit_qual;
    uint32_t exit_intr_info;   /* VM-exit interruption information (28.2.2); 0: none */
    uint32_t exit_intr_error;  /* VM-exit interruption error code (if intr_info bit 11) */
    uint64_t hits;             /* decisions made here (statistics) */
    uint64_t cr_emulated;      /* MOV CR completed in C without a VM exit (statistics) */
    uint64_t exit_rip;         /* RIP of the exiting instruction (vmlab_run_exit) */
    /* The current VMCS's area (vmcs.c), or NULL: the lean path writes a
     * fast-path VM exit's information fields into it at the exit
     * (vmlab_vmcs_store_exit). */
    uint64_t *vmcs;
    /* Coalesced port I/O served at IN/OUT sites that the policy lets through
     * (the policy outside non-root operation only), or NULL. */
    struct vmlab_pio *pio;
} vmlab_fastpath;
enum { VMLAB_FAST_IO_NONE = 0, VMLAB_FAST_IO_ALL = 1, VMLAB_FAST_IO_BITMAPS = 2 };
enum { VMLAB_FAST_MSR_NONE = 0, VMLAB_FAST_MSR_ALL = 1, VMLAB_FAST_MSR_BITMAPS = 2 };
enum { VMLAB_CR3_LOAD = 1, VMLAB_CR3_STORE = 2, VMLAB_CR8_LOAD = 4, VMLAB_CR8_STORE = 8 };
/* A MOV to/from CR0, CR3 or CR4 in VMX non-root operation that does not VM-exit
 * (f's policy said so), as the Python path completes it (vmm/vmx_intercept.py
 * _cr_access, emu/sensitive.py emulate_cr; twin emu/fastpath.py cr_value):
 * returns 1 -- write CR ``cr`` with *out --, 2 -- the register gets *out (a MOV
 * from CR) --, or 0: left to Python (any check that faults, CPL > 0, an
 * interrupt shadow, a change of CR0.PE/PG or CR4.PAE/PCIDE/LA57, CR2, CR8).
 * src: the source register; mode 16/32/64; hflags: QEMU's; cs_flags: the CS
 * descriptor flags (L, bit 21). */
int vmlab_cr_value(uint32_t cr, int write, uint64_t src, int mode, uint32_t hflags, uint64_t cr0, uint64_t cr3,
                   uint64_t cr4, uint64_t efer, uint32_t cs_flags, const vmlab_fastpath *f, uint64_t *out);

/* The decision on an instruction's bytes (mode 16/32/64; gpr: the 16
 * general registers, RAX..R15 -- RCX for RDMSR/WRMSR, RDX for IN/OUT DX, the
 * MOV CR source; priv as below):
 * 1 = a fast VM exit (f->exit_* filled), 0 = not decided here. */
int vmlab_fast_decide_bytes(const uint8_t *code, uint32_t n, int mode, const uint64_t *gpr,
                            vmlab_fastpath *f, const uint8_t *ram, uint64_t ram_size, uint32_t priv);
/* priv: what decides the faults that come before VM exits (SDM Vol. 3C
 * 26.1.1): bits 1:0 CPL, then the flags below.  A fault is never decided
 * here: the site is left to Python (emu/sensitive.py priority_fault). */
enum { VMLAB_PRIV_TSD = 1 << 2, VMLAB_PRIV_PCE = 1 << 3, VMLAB_PRIV_IOPL_SHIFT = 4, VMLAB_PRIV_VM = 1 << 6,
       VMLAB_PRIV_PE = 1 << 7, VMLAB_PRIV_OSXSAVE = 1 << 8 };
/* An exception raised by guest code (vector; sw: INT3/INTO/INT n, RIP is
 * after the instruction; error_code as pushed, used only for the vectors that
 * push one; cr2 the #PF's linear address) under f's exception policy: 1 = a
 * VM exit (f->exit_*: reason 0, qualification CR2 for #PF, the interruption
 * information and error code; SDM Vol. 3C 28.2.1, 28.2.2), 0 = not decided
 * here (delivered, or left to Python: #DB, NMI, #DF, INT n). */
int vmlab_fast_decide_exc(vmlab_fastpath *f, uint32_t vector, uint32_t sw, uint32_t error_code, uint64_t cr2);
/* The same at the trap site the vCPU stopped at (fault_vaddr/fault_paddr). */
int vmlab_fast_decide(vmlab_vcpu *v, vmlab_fastpath *f);
/* Run, read the registers and decide the fast path in one call (hooks.c). */
enum { VMLAB_STOP_FAST_EXIT = 100 };
int vmlab_run_exit(vmlab_vcpu *v, void *uc, uint64_t deadline, uint32_t flags, vmlab_regs *r,
                   vmlab_fastpath *f, int *err);
/* ---- coalesced port I/O (hooks.c; Python twin emu/pio.py) -----------------
 * KVM's coalesced MMIO/PIO for a polled serial port: a few ports whose 1-byte
 * IN returns a value with no side effect (a UART's LSR while no error bit is
 * set) or whose 1-byte OUT has no effect but the byte it carries (a UART's THR
 * while no THR-empty interrupt is enabled), as the device model publishes them.
 * At such a site the run goes on in C: the IN gets the value, the OUT is
 * queued (port << 8 | byte) for the model, which takes the queue before the
 * next exit is handled. */
enum { VMLAB_PIO_PORTS = 8, VMLAB_PIO_RING = 4096 };
typedef struct vmlab_pio {
    uint32_t nports;
    uint16_t port[8];
    uint8_t read_ok[8];        /* 1: a 1-byte IN of port[k] returns read_value[k] */
    uint8_t read_value[8];
    uint8_t write_ok[8];       /* 1: a 1-byte OUT to port[k] is queued */
    uint32_t nqueued;
    uint32_t ring[4096];       /* the queued OUTs, in order: port << 8 | byte */
    uint64_t completed;        /* INs and OUTs completed here (statistics) */
} vmlab_pio;
/* The decision at an IN/OUT site (code: its bytes; hflags: QEMU's; rflags,
 * rax, rdx: the registers): 1 = an IN served (*out: the byte for AL), 2 = an
 * OUT to queue (*out: the ring word), 0 = not here (another form, a prefix,
 * a port not in t, the TSS I/O permission bitmap to consult -- CR0.PE with
 * CPL > IOPL or virtual-8086 mode, SDM Vol. 1 19.5 --, an STI/MOV SS shadow,
 * RFLAGS.TF (the single-step #DB after it), a full ring).  *len: the instruction's length. */
int vmlab_pio_decide(const uint8_t *code, uint32_t n, uint32_t hflags, uint64_t rflags, uint64_t rax,
                     uint64_t rdx, const vmlab_pio *t, uint32_t *len, uint32_t *out);

/* ---- the VMCS in native memory (vmcs.c; Python twins in vmm/vmcs.py) ----------
 * A fixed layout: one 64-bit slot per field at (width << 2 | type) << 6 |
 * index of its encoding (SDM Vol. 3C 25.11.2, Table 25-21); 1024 slots. */
enum { VMLAB_VMCS_SLOTS = 1024 };
uint32_t vmlab_vmcs_slot(uint32_t encoding);
/* The encoding of level-image entry k (VMLAB_LV_*), 0 past the end. */
uint32_t vmlab_vmcs_guest_image_encoding(uint32_t k);
/* A VM exit's guest-state store (SDM Vol. 3C 28.3): the register file's
 * level image (vmlab_level_save) into its fields, and bit 3 of the
 * interruptibility state (blocking by NMI, Table 25-3) from nmi_blocked. */
void vmlab_vmcs_store_guest(const vmlab_regs *r, uint64_t *vmcs, uint32_t nmi_blocked);
/* A fast-path VM exit's information fields from f's decision (28.2). */
void vmlab_vmcs_store_exit(const vmlab_fastpath *f, uint64_t *vmcs);

/* ---- the run loop's lean path (hooks.c; Python twin emu/lean.py) ----------
 * One exit in one native call with one argument: what the run loop's lean
 * path (vmm/runloop.py) did around vmlab_run_exit in Python -- the attention
 * word and the deadline (the slice, the next timer, the instruction limit)
 * -- done here. */
typedef struct vmlab_lean {
    vmlab_vcpu *v;
    void *uc;
    vmlab_regs *r;
    vmlab_fastpath *f;         /* the intercept policy's fast path, or NULL */
    uint64_t slice;            /* instructions (virtual ns) one run may take at most */
    uint64_t timer;            /* earliest timer deadline in virtual time; ~0: none */
    uint64_t limit;            /* the run's instruction limit in virtual time; ~0: none */
    uint64_t runs;             /* runs made (the machine's exit count adds them) */
    int32_t err;               /* uc_err of the last run */
    uint32_t pad;
} vmlab_lean;
/* VMLAB_LEAN_LOOK: nothing ran -- the attention word is set, or a timer or
 * the limit is due; the loop's general path looks.  A fast-path VM exit comes
 * back as one word, VMLAB_LEAN_EXIT | reason (bits 15:0) | instruction length
 * << 17 | qualification << 21 (the fast path's qualifications fit 32 bits;
 * a larger one comes back as VMLAB_STOP_FAST_EXIT, decided in Python), so
 * the handler needs no field read. */
enum { VMLAB_LEAN_LOOK = 101 };
enum { VMLAB_LEAN_EXIT = 0x10000 };
/* The run's deadline: min(now + slice, timer, limit) (a slice past 2^64
 * ends at the timer), or 0 -- do not run, look -- when attention is set or
 * now has reached the timer or the limit. */
uint64_t vmlab_lean_deadline(uint32_t attention, uint64_t now, uint64_t slice, uint64_t timer, uint64_t limit);
/* As vmlab_run_exit from r->rip with the deadline min(icount + slice,
 * timer, limit) and flags 0; VMLAB_LEAN_LOOK without running when the
 * attention word is set or icount has reached the timer or the limit. */
int64_t vmlab_lean_run(vmlab_lean *c);

/* ---- split virtqueue fast paths (virtq.c; Python twins in devices/virtio/virtq.py) ----
 * RAM is [0, ram_low) and [4 GiB, 4 GiB + ram_high) (emu/memory.py). */
enum { VMLAB_VQ_MAX_INDIRECT = 1024, VMLAB_VQ_MAX_SEGS = 512 };
/* Why a batch ended: the ring had nothing more, a chain (or the ring) the
 * Python device model must handle, or out of room (frames / output). */
enum { VMLAB_VQ_STOP_EMPTY = 0, VMLAB_VQ_STOP_PUNT = 1, VMLAB_VQ_STOP_FULL = 2 };
typedef struct vmlab_vq {
    uint64_t desc;             /* guest-physical Descriptor Table (§2.7.5) */
    uint64_t avail;            /* Available Ring (§2.7.6) */
    uint64_t used;             /* Used Ring (§2.7.8) */
    uint32_t size;             /* Queue Size */
    uint32_t max_size;
    uint32_t ready;
    uint32_t event_idx;        /* VIRTIO_F_EVENT_IDX negotiated */
    uint16_t last_avail;       /* next available ring entry to take */
    uint16_t used_idx;         /* next used ring index to write */
    uint32_t pad;
} vmlab_vq;
typedef struct vmlab_vq_result {
    uint32_t done;             /* chains completed (used elements written) */
    uint32_t ok;               /* blk: requests with VIRTIO_BLK_S_OK */
    uint32_t errors;           /* blk: IOERR; net: frames dropped */
    uint32_t wrote;            /* blk: OUT requests carried out */
    uint32_t frames;           /* net: frames moved */
    uint32_t consumed;         /* net rx: input frames used up (moved or dropped) */
    uint32_t stop;             /* VMLAB_VQ_STOP_* */
    uint32_t pad;
    uint64_t bytes;            /* data bytes moved */
    uint64_t dma_lo, dma_hi;   /* guest-physical span the device wrote (data, status; not the rings):
                                  [dma_lo, dma_hi), empty when dma_hi == 0 */
} vmlab_vq_result;
int vmlab_vq_blk(uint8_t *ram, uint64_t ram_low, uint64_t ram_high, vmlab_vq *q, int fd, uint64_t capacity, uint32_t allow_write,
                 vmlab_vq_result *res);
int vmlab_vq_net_tx(uint8_t *ram, uint64_t ram_low, uint64_t ram_high, vmlab_vq *q, uint32_t max_frame, uint8_t *out,
                    uint64_t out_cap, uint32_t *lens, uint32_t max_frames, vmlab_vq_result *res);
int vmlab_vq_net_rx(uint8_t *ram, uint64_t ram_low, uint64_t ram_high, vmlab_vq *q, uint32_t max_frame, const uint8_t *frames,
                    const uint32_t *lens, uint32_t nframes, const uint8_t *hdr, vmlab_vq_result *res);
#endif

/* ---- guest-visible VMX: L1's VMREAD/VMWRITE in C (native/nested.c; twin vmm/nested_shadow.py) ---- */
enum { VMLAB_VMX_SHADOW_MAX = 64 };
typedef struct vmlab_vmx_shadow {
    uint32_t active;           /* 1: serve VMREAD/VMWRITE from the table (L1 in VMX root operation) */
    uint32_t n;                /* entries in use */
    uint64_t dirty;            /* bit k: value[k] written by a VMWRITE served here, not yet in the VMCS */
    uint64_t hits;             /* instructions served (statistics) */
    uint32_t enc[64];          /* field encodings (full access) */
    uint8_t writable[64];      /* VMWRITE may write it (else Python decides: VMfailValid 13) */
    uint64_t mask[64];         /* the field's width */
    uint64_t value[64];
    /* VMRESUME in C (vmlab_vmx_resume_ok): Python sets entry_ready when the
     * current VMCS's L2 may be entered from l2_img with RIP/RSP from the table */
    uint32_t entry_ready;
    uint32_t entered;          /* set by C after such an entry (Python then does its bookkeeping) */
    uint64_t entry_rip_rsp;    /* table bits of GUEST_RIP and GUEST_RSP */
    uint64_t entry_cheap;      /* table bits of the read-only fields (exit information) */
    uint32_t rip_k, rsp_k;     /* table indices of GUEST_RIP, GUEST_RSP */
    uint32_t rip_bits;         /* 0: RIP bits 63:32 must be 0; else canonical at this linear-address width */
    uint32_t ept_enabled;      /* L2's EPT (SDM 29.3) */
    uint64_t eptp, tsc_offset;
    uint64_t entries;          /* VMRESUMEs executed here (statistics) */
    vmlab_fastpath *l2_fastpath;   /* L2's fast-path policy, the run goes on with it */
    uint64_t l2_img[43];       /* L2's state as stored at its last VM exit (VMLAB_LV_*) */
    /* VM exits of L2 reflected to L1 in C (vmlab_vmx_reflect_ok/_store): Python
     * sets reflect_ready when an L2 exit the fast path decides needs nothing
     * Python tracks; entered is then set on every level change made here */
    uint32_t reflect_ready;
    uint32_t in_l2;            /* L2 runs, entered here (cleared by a reflection here) */
    uint64_t reflections;      /* VM exits reflected here since Python last looked */
    uint64_t reflected_total;  /* statistics */
    uint64_t host_efer;        /* the EFER host_img was built for (without "load IA32_EFER" it depends on L2's) */
    uint8_t img_k[43];         /* table index of each VMLAB_LV_* field, VMLAB_VMX_SHADOW_MAX when not there */
    uint8_t x_k[5];            /* table indices: exit reason, qualification, instruction length,
                                  exit interruption information, IDT-vectoring information */
    uint8_t intr_k;            /* table index of the guest interruptibility state */
    uint8_t pad_k[7];
    uint64_t host_img[43];     /* L1's host-state area as an image (vmm/nested_state.py host_image) */
    /* The current VMCS's area (vmcs.c), or NULL: a VMREAD of a field not in
     * the table is served from it when readable[slot] says the slot holds a
     * supported field (a reflection here stores L2's guest state there too). */
    uint64_t *vmcs;
    uint8_t readable[1024];
    /* ... and a VMWRITE of such a field into it (a read-only field only with
     * vmwrite_any, IA32_VMX_MISC[29]), its slot marked in vmcs_dirty (Python
     * puts those writes into the VMCS's tracked set; a VMRESUME here needs
     * none pending) */
    uint32_t vmwrite_any;
    uint32_t pad_w;
    uint64_t vmcs_dirty[16];
} vmlab_vmx_shadow;
/* A VMRESUME at code[0..n) that C may execute (3, its length) or 0. */
int vmlab_vmx_resume_ok(const uint8_t *code, uint32_t n, uint32_t irq_window, uint32_t trap_kinds,
                        const vmlab_vmx_shadow *s);
/* One VMREAD/VMWRITE at code[0..n): its length if served, 0 if Python must take it
 * (a field outside the table is read and written in s->vmcs when it is set). */
int vmlab_vmx_shadow_insn(const uint8_t *code, uint32_t n, uint64_t *gpr, uint64_t *rflags,
                          vmlab_vmx_shadow *s);
/* May C reflect the L2 VM exit the fast path just decided (1) or not (0)? */
int vmlab_vmx_reflect_ok(const vmlab_regs *r, uint32_t trap_kinds, const vmlab_vmx_shadow *s);
/* Pure: that exit's guest state into l2_img and the table, its exit information
 * from f into the table; the table serves L1 again with its VMRESUME armed. */
void vmlab_vmx_reflect_store(const vmlab_regs *r, const vmlab_fastpath *f, vmlab_vmx_shadow *s);
/* vmlab_run_exit, serving the VMREADs and VMWRITEs the table can (s->active). */
int vmlab_run_exit_vmx(vmlab_vcpu *v, void *uc, uint64_t deadline, uint32_t flags, vmlab_regs *r,
                       vmlab_fastpath *f, vmlab_vmx_shadow *s, int *err);

/* ---- guest-visible VMX: the L1<->L2 level switch in bulk (native/nested.c; twin vmm/nested_state.py) ----
 * A level's state as VM entry loads it and VM exit stores it (SDM Vol. 3C 28.3.2,
 * 28.5, 29.3), one uint64_t per field in this order; the segments as
 * selector, base, limit, VMX access rights (Table 25-2; bit 16 = unusable). */
enum {
    VMLAB_LV_RIP = 0, VMLAB_LV_RSP = 1, VMLAB_LV_RFLAGS = 2, VMLAB_LV_CR0 = 3, VMLAB_LV_CR3 = 4,
    VMLAB_LV_CR4 = 5, VMLAB_LV_EFER = 6,
    VMLAB_LV_SEG = 7,          /* 8 segments (ES CS SS DS FS GS LDTR TR) x (selector, base, limit, ar) */
    VMLAB_LV_GDTR_BASE = 39, VMLAB_LV_GDTR_LIMIT = 40, VMLAB_LV_IDTR_BASE = 41, VMLAB_LV_IDTR_LIMIT = 42,
    VMLAB_LV_N = 43
};
/* Pure: the image of the register file (what a VM exit stores). */
void vmlab_level_save(const vmlab_regs *r, uint64_t *img);
/* Pure: r with the image's RIP, RSP, RFLAGS, descriptor tables and segment
 * caches, and the segment-derived hflags recomputed (CR0/CR3/CR4/EFER and the
 * hflags they set are taken as already loaded). */
void vmlab_level_compose(vmlab_regs *r, const uint64_t *img);
/* Load the image into the vCPU: CR0/CR3/CR4/EFER when they differ (cached
 * translations dropped then), the rest through vmlab_level_compose, written in
 * one register batch and one segment-cache store.  r is the vCPU's register
 * file, read afresh first (the caller has written back its changes). */
int vmlab_level_load(vmlab_vcpu *v, void *uc, vmlab_regs *r, const uint64_t *img);
/* CR0/CR3/CR4/EFER as a VM entry or exit loads them (hooks.c): in the order
 * paging off, EFER, CR4, CR3, CR0; translations flushed; v's copies synced. */
int vmlab_paging_write(vmlab_vcpu *v, void *uc, uint64_t cr0, uint64_t cr3, uint64_t cr4, uint64_t efer);
