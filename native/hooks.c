/* vmlab native hooks: everything Unicorn calls per block, per TLB miss or per
 * sensitive instruction.  No Python runs here (rule 1); the C side records why it
 * stopped in vmlab_vcpu and calls uc_emu_stop, and Python turns that into an
 * exit value.
 */
#include <stdlib.h>
#include <string.h>
#include <stdbool.h>
#include <stdarg.h>
#include <pthread.h>
#include <time.h>
#include <unicorn/unicorn.h>
#include "vmlab.h"

/* ---- Unicorn / Capstone entry points handed over at run time ---------------- */
typedef uc_err (*fn_hook_add)(uc_engine *, uc_hook *, int, void *, void *, uint64_t, uint64_t, ...);
typedef uc_err (*fn_hook_del)(uc_engine *, uc_hook);
typedef uc_err (*fn_reg_read)(uc_engine *, int, void *);
typedef uc_err (*fn_reg_write)(uc_engine *, int, const void *);
typedef uc_err (*fn_reg_batch)(uc_engine *, int const *, void **, int);
typedef uc_err (*fn_emu_stop)(uc_engine *);
typedef uc_err (*fn_ctl)(uc_engine *, uc_control_type, ...);
typedef uc_err (*fn_ctx_alloc)(uc_engine *, uc_context **);
typedef uc_err (*fn_ctx_io)(uc_engine *, uc_context *);
typedef uc_err (*fn_ctx_free)(uc_context *);
typedef int (*fn_cs_open)(int, int, size_t *);
typedef size_t (*fn_cs_disasm)(size_t, const uint8_t *, size_t, uint64_t, size_t, void **);
typedef void (*fn_cs_free)(void *, size_t);

typedef uc_err (*fn_emu_start)(uc_engine *, uint64_t, uint64_t, uint64_t, size_t);

static struct {
    fn_emu_start emu_start;
    fn_hook_add hook_add;
    fn_hook_del hook_del;
    fn_reg_read reg_read;
    fn_reg_write reg_write;
    fn_reg_batch reg_read_batch, reg_write_batch;
    fn_emu_stop emu_stop;
    fn_ctl ctl;
    fn_ctx_alloc ctx_alloc;
    fn_ctx_io ctx_save, ctx_restore;
    fn_ctx_free ctx_free;
    fn_cs_open cs_open;
    fn_cs_disasm cs_disasm;
    fn_cs_free cs_free;
} api;

int vmlab_set_api(void *hook_add, void *hook_del, void *reg_read, void *reg_write, void *reg_read_batch,
                  void *reg_write_batch, void *emu_stop, void *ctl, void *context_alloc,
                  void *context_save, void *context_restore, void *context_free,
                  void *cs_open, void *cs_disasm, void *cs_free)
{
    api.hook_add = (fn_hook_add)hook_add;
    api.hook_del = (fn_hook_del)hook_del;
    api.reg_read = (fn_reg_read)reg_read;
    api.reg_write = (fn_reg_write)reg_write;
    api.reg_read_batch = (fn_reg_batch)reg_read_batch;
    api.reg_write_batch = (fn_reg_batch)reg_write_batch;
    api.emu_stop = (fn_emu_stop)emu_stop;
    api.ctl = (fn_ctl)ctl;
    api.ctx_alloc = (fn_ctx_alloc)context_alloc;
    api.ctx_save = (fn_ctx_io)context_save;
    api.ctx_restore = (fn_ctx_io)context_restore;
    api.ctx_free = (fn_ctx_free)context_free;
    api.cs_open = (fn_cs_open)cs_open;
    api.cs_disasm = (fn_cs_disasm)cs_disasm;
    api.cs_free = (fn_cs_free)cs_free;
    return 0;
}

/* ---- private per-vCPU state ------------------------------------------------- */
#define ICACHE_SIZE 16384  /* direct-mapped block -> instruction-count cache */
#define EXITSET_BITS 14
#define RESCAN_MAX 16
#define STLB_SIZE 8192   /* software TLB of completed walks (direct-mapped) */

/* A completed translation: tag = linear page | user (bit 1) | AC (bit 2) | valid (bit 0). */
struct stlb_entry { uint64_t tag; uint64_t paddr; uint32_t perms, gen; };

struct icache_entry { uint64_t pc; uint32_t size_mode; uint32_t ninsn; uint64_t ppage; uint32_t tb; uint32_t hf; };

struct priv {
    uc_engine *uc;
    uint64_t pass_site;         /* vmlab_step_past_site: the site whose hook lets it run once (~0: none) */
    uc_context *ctx;
    size_t cs_handle[3];        /* capstone handles: 16, 32, 64-bit */
    struct icache_entry icache[ICACHE_SIZE];
    uint64_t *exitset;          /* open-addressing hash set of armed linear addresses */
    uint32_t exitset_cap, exitset_used;
    uc_hook *site_hooks;        /* parallel to v->exits */
    struct { uint64_t vpage, ppage; } rescan[RESCAN_MAX];   /* code pages written */
    uint32_t nrescan, rescan_overflow;
    struct stlb_entry stlb[STLB_SIZE];
    uint32_t stlb_gen;          /* entries of another generation are empty (a flush is one add) */
    uint32_t *page_tbs;         /* per RAM page: 1 + index of the last registry block starting on it, 0 none */
    uint32_t *tb_page_next;     /* per registry block: 1 + index of the previous one on its page */
    uint32_t tb_page_next_cap;
    uint32_t *tb_span;          /* registry blocks that cross a page boundary (checked on every write) */
    uint32_t ntb_span, tb_span_cap;
    uint32_t tb_flush_pending;  /* a host-side write hit code: drop every translation before running */
    uint32_t *tbhash;           /* open addressing over indices into v->tbs (+1; 0 = empty) */
    uint32_t tbhash_cap;
    /* ---- the block hook's own state (hook_block, vmlab_run) ---- */
    uint64_t fast_deadline;     /* virtual clock: the hook's one compare; 0 = take the slow path */
    const volatile uint32_t *hf_ptr;   /* &CPUX86State.hflags (NULL: unknown, slow path) */
    volatile uint32_t host_stop;       /* host clock: set by the timer thread at the deadline */
    uint32_t host_slow;         /* host clock: a rare condition needs the slow path */
    uint32_t want_blocks;       /* host clock: keep the block registry (logs, exec counts) */
    uint32_t clock_host;        /* 0: virtual time = icount; 1: host monotonic time */
    uc_hook block_hook;         /* the installed UC_HOOK_BLOCK (hook_block or hook_block_host) */
    uint64_t origin_ns;         /* host clock: CLOCK_MONOTONIC value at virtual time 0 */
    struct host_timer {
        uint64_t when;          /* CLOCK_MONOTONIC ns */
        volatile uint32_t *flag;
        struct host_timer *next;
        int linked;
    } timer;
};

#define HF_CPL_MASK 3u
#define HF_CS32_MASK (1u << 4)
#define HF_LMA_MASK (1u << 14)
#define HF_CS64_MASK (1u << 15)

static inline uint8_t *ctx_data(struct priv *p) { return (uint8_t *)p->ctx; }

static uint32_t read_hflags(vmlab_vcpu *v, struct priv *p)
{
    uint32_t hf = 0;
    if (__builtin_expect(v->env != NULL, 1))
        return *(volatile uint32_t *)(v->env + v->env_hflags);
    if (api.ctx_save(p->uc, p->ctx) != UC_ERR_OK || v->ctx_hflags <= 0)
        return 0;
    memcpy(&hf, ctx_data(p) + v->ctx_hflags, 4);
    return hf;
}

static int current_cpl(vmlab_vcpu *v, struct priv *p)
{
    /* CPL is QEMU's hflags[1:0] (0 in real mode, 3 in virtual-8086 mode). */
    if (__builtin_expect(v->env != NULL, 1))
        return (int)(*(volatile uint32_t *)(v->env + v->env_hflags) & 3);
    uint64_t cs = 0, fl = 0;
    if (!(v->cr0 & 1))
        return 0;
    api.reg_read(p->uc, UC_X86_REG_CS, &cs);
    api.reg_read(p->uc, UC_X86_REG_EFLAGS, &fl);
    if (fl & (1u << 17))
        return 3;
    return (int)(cs & 3);
}

/* ---- trap-site classifier ------------------------------------------------------- */
/* The opcode table is generated from FORMS in emu/trapscan.py (SDM Vol. 2
 * Appendix A opcode maps); emu/trapscan.py also holds the pure-Python twin of
 * vmlab_classify and vmlab_block_sites, which tests/unit/test_trapscan.py
 * compares with these on random bytes.  Change both together. */
#include "trap_table.h"

static inline int is_legacy_prefix(uint8_t b)
{
    return trap_byte_class[b] & TT_BC_LEGACY;
}

static inline int form_ok(const struct trap_form *f, uint32_t cls, uint8_t rex)
{
    return (f->pfx & cls) && !((f->flags & TT_NO_REX_B) && (rex & 1));
}

static int modrm_ok(const struct trap_form *f, uint8_t modrm)
{
    const unsigned mod = modrm >> 6, reg = (modrm >> 3) & 7, rm = modrm & 7;
    if ((f->mod == TT_MOD_MEM && mod == 3) || (f->mod == TT_MOD_REG && mod != 3))
        return 0;
    return (f->reg == TT_ANY || f->reg == reg) && (f->rm == TT_ANY || f->rm == rm);
}

/* Kinds (bit mask) of the forms in maps [map_lo, map_hi] accepted with these prefixes. */
static uint32_t maps_mask(int map_lo, int map_hi, uint32_t cls, uint8_t rex)
{
    uint32_t m = 0;
    for (int k = 0; k < TT_NFORMS; k++)
        if (trap_forms[k].map >= map_lo && trap_forms[k].map <= map_hi && form_ok(&trap_forms[k], cls, rex))
            m |= 1u << trap_forms[k].kind;
    return m;
}

/* The instruction needs at least k bytes: if that is more than 15 (#GP, SDM
 * Vol. 2A 2.3.11) it is no site; if it is more than the n bytes given, the
 * answer is "truncated" with the kinds still possible (maskexpr, evaluated
 * only then). */
#define NEED(k, maskexpr) do {                                              \
        if ((k) > 15) {                                                     \
            out->status = VMLAB_CLASS_NONE;                                 \
            return -1;                                                      \
        }                                                                   \
        if ((k) > n) {                                                      \
            const uint32_t maybe_ = (maskexpr);                             \
            out->status = maybe_ ? VMLAB_CLASS_TRUNCATED : VMLAB_CLASS_NONE; \
            out->maybe = maybe_;                                            \
            return -1;                                                      \
        }                                                                   \
    } while (0)

/* Which trap kind is the instruction at code[0] (mode 16, 32 or 64)?  The
 * decoding rules are spelled out in emu/trapscan.py.  Returns out->kind. */
int vmlab_classify(const uint8_t *code, uint32_t n, int mode, vmlab_insn *out)
{
    memset(out, 0, sizeof *out);
    out->kind = -1;
    out->seg = 255;
    uint32_t i = 0, pfx = 0;
    uint8_t rex = 0, rep = 0;
    for (; i < n && i < 15; i++) {
        const uint8_t b = code[i];
        if (mode == 64 && (b & 0xf0) == 0x40) {
            rex = b;
            continue;
        }
        if (!is_legacy_prefix(b))
            break;
        rex = 0;    /* a REX byte counts only right before the opcode (SDM Vol. 2A 2.2.1) */
        switch (b) {
        case 0xf0: pfx |= VMLAB_PFX_LOCK; break;
        case 0xf2: pfx |= VMLAB_PFX_REPNE; rep = b; break;
        case 0xf3: pfx |= VMLAB_PFX_REP; rep = b; break;
        case 0x66: pfx |= VMLAB_PFX_OPSIZE; break;
        case 0x67: pfx |= VMLAB_PFX_ADSIZE; break;
        default:
            pfx |= VMLAB_PFX_SEG;
            out->seg = b == 0x26 ? 0 : b == 0x2e ? 1 : b == 0x36 ? 2 : b == 0x3e ? 3 : b == 0x64 ? 4 : 5;
        }
    }
    if (rex)
        pfx |= VMLAB_PFX_REX;
    out->nprefix = i;
    out->prefixes = pfx;
    out->rex = rex;
    out->mandatory = rep ? rep : (pfx & VMLAB_PFX_OPSIZE) ? 0x66 : 0;
    uint32_t cls = rep == 0xf3 ? TT_P_F3 : rep == 0xf2 ? TT_P_F2 : (pfx & VMLAB_PFX_OPSIZE) ? TT_P_66 : TT_P_NONE;

    NEED(i + 1, TT_ALL_KINDS);
    uint32_t map, op, p;
    const uint8_t b = code[i];
    if ((b == 0xc4 || b == 0xc5) && mode != 16) {
        /* VEX (SDM Vol. 2A 2.3.5): #UD for every trapped instruction, but
         * Unicorn 2.1.4 runs a VEX-encoded 0F-map opcode as the legacy one
         * (C5 F8 32 is RDMSR there).  So a VEX form is a site of its opcode's
         * kind and the stop raises #UD.  Decoded like Unicorn: not in 16-bit
         * code, in 32-bit code only if the next byte's bits 7:6 are 11 (else
         * LES/LDS), never after F0/66/F2/F3/REX. */
        out->opmap = 0;
        out->opcode = b;
        if ((pfx & (VMLAB_PFX_LOCK | VMLAB_PFX_OPSIZE | VMLAB_PFX_REP | VMLAB_PFX_REPNE)) || rex)
            return -1;
        NEED(i + 2, maps_mask(1, 2, TT_P_NONE | TT_P_66 | TT_P_F3 | TT_P_F2, 0));
        const uint8_t vex2 = code[i + 1];
        if (mode != 64 && (vex2 & 0xc0) != 0xc0)
            return -1;
        uint32_t pp, q;
        if (b == 0xc5) {
            pp = vex2 & 3; map = 1; q = i + 2;
        } else {
            NEED(i + 3, maps_mask(1, 2, TT_P_NONE | TT_P_66 | TT_P_F3 | TT_P_F2, 0));
            if ((vex2 & 0x1f) != 1 && (vex2 & 0x1f) != 2)
                return -1;
            pp = code[i + 2] & 3; map = (vex2 & 0x1f) == 1 ? 1 : 2; q = i + 3;
        }
        static const uint8_t pp_mandatory[4] = {0, 0x66, 0xf3, 0xf2};
        static const uint8_t pp_class[4] = {TT_P_NONE, TT_P_66, TT_P_F3, TT_P_F2};
        pfx |= VMLAB_PFX_VEX;
        out->prefixes = pfx;
        out->mandatory = pp_mandatory[pp];
        cls = pp_class[pp];
        NEED(q + 1, maps_mask((int)map, (int)map, cls, rex));
        op = code[q]; p = q + 1;
    } else if (b == 0x0f) {
        NEED(i + 2, maps_mask(1, 2, cls, rex));
        if (code[i + 1] == 0x38) {
            NEED(i + 3, maps_mask(2, 2, cls, rex));
            map = 2; op = code[i + 2]; p = i + 3;
        } else {
            map = 1; op = code[i + 1]; p = i + 2;
        }
    } else {
        map = 0; op = b; p = i + 1;
    }
    out->opmap = (uint8_t)map;
    out->opcode = (uint8_t)op;
    const struct trap_form *cand = &trap_forms[trap_first[map][op]];
    const uint32_t ncand = trap_count[map][op];
    const struct trap_form *form = NULL;
    uint32_t cand_mask = 0;
    for (uint32_t k = 0; k < ncand; k++)
        if (form_ok(&cand[k], cls, rex)) {
            cand_mask |= 1u << cand[k].kind;
            if (!form)
                form = &cand[k];
        }
    if (!form)
        return -1;
    if (form->modrm != TT_NO_MODRM) {
        NEED(p + 1, cand_mask);
        const uint8_t modrm = code[p++];
        out->modrm = modrm;
        out->has_modrm = 1;
        form = NULL;
        for (uint32_t k = 0; k < ncand && !form; k++)
            if (form_ok(&cand[k], cls, rex) && modrm_ok(&cand[k], modrm))
                form = &cand[k];
        if (!form)
            return -1;
        const unsigned mod = modrm >> 6, rm = modrm & 7;
        if (form->modrm == TT_MODRM && mod != 3) {
            const int addr16 = mode != 64 && (mode == 16) != ((pfx & VMLAB_PFX_ADSIZE) != 0);
            unsigned disp;
            if (addr16) {
                disp = (mod == 2 || (mod == 0 && rm == 6)) ? 2 : mod;
            } else {
                unsigned base = rm;
                if (rm == 4) {
                    NEED(p + 1, 1u << form->kind);
                    base = code[p++] & 7;
                }
                disp = (mod == 2 || (mod == 0 && base == 5)) ? 4 : mod;
            }
            p += disp;
        }
    }
    p += form->imm;
    if (form->flags & TT_IMM_PTR)
        p += ((mode == 16) != ((pfx & VMLAB_PFX_OPSIZE) != 0)) ? 4 : 6;
    if (p > 15)
        return -1;
    out->status = VMLAB_CLASS_TRAP;
    out->kind = form->kind;
    out->length = p;
    return out->kind;
}
#undef NEED

/* The sites among a block's instruction starts (vmlab.h). */
int vmlab_block_sites(const uint8_t *code, uint32_t len, const uint32_t *starts, uint32_t nstarts, int mode,
                      uint32_t kinds, uint32_t *sites, uint8_t *site_kinds, uint32_t max_sites)
{
    uint32_t n = 0;
    vmlab_insn r;
    for (uint32_t i = 0; i < nstarts && n < max_sites; i++) {
        const uint32_t s = starts[i];
        if (s >= len)
            break;
        /* Shortcut (exact): after the prefixes, the first byte must start a form. */
        const uint8_t pfx_class = mode == 64 ? TT_BC_LEGACY | TT_BC_REX : TT_BC_LEGACY;
        const uint32_t lim = len - s < 15 ? len : s + 15;
        uint32_t j = s;
        while (j < lim && (trap_byte_class[code[j]] & pfx_class))
            j++;
        if (j < lim && !(trap_byte_class[code[j]] & TT_BC_START))
            continue;
        vmlab_classify(code + s, lim - s, mode, &r);
        /* An instruction start inside the block is complete in it: a truncated
         * answer means bytes the CPU itself could not decode as a trap form. */
        if (r.status != VMLAB_CLASS_TRAP || !((kinds >> r.kind) & 1))
            continue;
        if (site_kinds)
            site_kinds[n] = (uint8_t)r.kind;
        sites[n++] = s;
    }
    return (int)n;
}

/* ---- the armed-exit set ---------------------------------------------------- */
static void push_u32(uint32_t **arr, uint32_t *n, uint32_t *cap, uint32_t val)
{
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 256;
        *arr = realloc(*arr, sizeof(uint32_t) * *cap);
    }
    (*arr)[(*n)++] = val;
}

static uint32_t hash64(uint64_t x)
{
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33;
    return (uint32_t)x;
}

static int exitset_has(struct priv *p, uint64_t a)
{
    uint32_t m = p->exitset_cap - 1, i = hash64(a) & m;
    while (p->exitset[i] != ~0ull) {
        if (p->exitset[i] == a) return 1;
        i = (i + 1) & m;
    }
    return 0;
}

static void exitset_insert_raw(struct priv *p, uint64_t a)
{
    uint32_t m = p->exitset_cap - 1, i = hash64(a) & m;
    while (p->exitset[i] != ~0ull) {
        if (p->exitset[i] == a) return;
        i = (i + 1) & m;
    }
    p->exitset[i] = a;
    p->exitset_used++;
}

static void exitset_rebuild(vmlab_vcpu *v, struct priv *p, uint32_t cap)
{
    free(p->exitset);
    p->exitset_cap = cap;
    p->exitset_used = 0;
    p->exitset = malloc(sizeof(uint64_t) * cap);
    memset(p->exitset, 0xff, sizeof(uint64_t) * cap);
    for (uint32_t k = 0; k < v->nexits; k++)
        exitset_insert_raw(p, v->exits[k]);
}

static void hook_site(uc_engine *uc, uint64_t addr, uint32_t size, void *ud);
static int run_sites(vmlab_vcpu *v, void *uc, uint64_t begin, size_t count);

/* Trap sites are one-address UC_HOOK_CODE hooks, not Unicorn "exits": at the end
 * of every emu_start Unicorn invalidates the translated block of every exit
 * address, which costs O(#exits) per run and refills the TLB outside the CPU
 * loop, where a failing fill would longjmp into a dead frame.  A bounded code
 * hook is only compiled into the one instruction it covers.  But Unicorn walks
 * its whole list of code hooks for every instruction it translates, and again
 * in every hooked instruction it runs, so the list must stay short: only real
 * instruction starts of blocks that ran are armed (block_icount), never every
 * byte offset of a code page that could start one (Linux's text has ~70,000
 * such offsets for the machine's kinds against a few hundred real sites). */
static int exit_add(vmlab_vcpu *v, struct priv *p, uint64_t a)
{
    if (exitset_has(p, a))
        return 0;
    if (v->nexits == v->exits_cap) {
        v->exits_cap = v->exits_cap ? v->exits_cap * 2 : 256;
        v->exits = realloc(v->exits, sizeof(uint64_t) * v->exits_cap);
        p->site_hooks = realloc(p->site_hooks, sizeof(uc_hook) * v->exits_cap);
    }
    uc_hook h = 0;
    if (api.hook_add(p->uc, &h, UC_HOOK_CODE, (void *)hook_site, v, a, a) != UC_ERR_OK)
        return 0;
    p->site_hooks[v->nexits] = h;
    v->exits[v->nexits++] = a;
    if ((p->exitset_used + 1) * 2 > p->exitset_cap)
        exitset_rebuild(v, p, p->exitset_cap * 2);
    else
        exitset_insert_raw(p, a);
    v->stat_sites_armed++;
    return 1;
}

int vmlab_exit_remove(vmlab_vcpu *v, void *uc, uint64_t addr)
{
    struct priv *p = v->priv;
    uint32_t k;
    for (k = 0; k < v->nexits; k++)
        if (v->exits[k] == addr)
            break;
    if (k == v->nexits)
        return 0;
    api.hook_del(uc, p->site_hooks[k]);
    v->nexits--;
    v->exits[k] = v->exits[v->nexits];
    p->site_hooks[k] = p->site_hooks[v->nexits];
    exitset_rebuild(v, p, p->exitset_cap);
    api.ctl(uc, UC_CTL_WRITE(UC_CTL_TB_REMOVE_CACHE, 2), addr, addr + 1);
    return 1;
}

/* Drop every armed site; every block is classified again at its next run. */
static void sites_reset(vmlab_vcpu *v, struct priv *p, void *uc)
{
    for (uint32_t k = 0; k < v->nexits; k++)
        api.hook_del(uc, p->site_hooks[k]);
    v->nexits = 0;
    exitset_rebuild(v, p, p->exitset_cap);
    /* Every block is classified again at its next run (the icache misses, the
     * registry sees an old sites_gen): blocks that now hold a site are dropped
     * and translated again with it.  The others keep their translation: a
     * deleted hook compiled into one finds nothing and costs a call. */
    if (++v->sites_gen == 0)
        v->sites_gen = 1;
    for (uint32_t k = 0; k < ICACHE_SIZE; k++)
        p->icache[k].pc = ~0ull;
}

int vmlab_trap_set_kinds(vmlab_vcpu *v, void *uc, uint32_t kinds)
{
    struct priv *p = v->priv;
    if (kinds == v->trap_kinds)
        return 0;
    v->trap_kinds = kinds;
    sites_reset(v, p, uc);
    return 1;
}

/* Drop registry block i's icache entry, if the slot of its pc holds it. */
static inline void icache_forget(vmlab_vcpu *v, struct priv *p, uint32_t i)
{
    const uint64_t pc = v->tbs[i].pc;
    struct icache_entry *ce = &p->icache[(pc ^ (pc >> 13)) & (ICACHE_SIZE - 1)];
    if (ce->pc == pc && ce->tb == i)
        ce->pc = ~0ull;
}

/* Invalidate registry block i if it is valid and holds bytes of physical
 * page ``page`` -- or, with ``crossing``, whatever page was written: a block
 * that crosses a page boundary records the physical address of its first
 * byte only, and its second page need not follow the first physically. */
static int tb_invalidate(vmlab_vcpu *v, uint32_t i, uint64_t page, int crossing)
{
    vmlab_tb *t = &v->tbs[i];
    if (t->valid && (crossing || (t->paddr < page + 4096 && t->paddr + t->size > page))) {
        t->valid = 0;
        t->sites_gen = 0;
        t->invalidations++;
        v->stat_tb_invalidations++;
        push_u32(&v->tb_inval, &v->ntb_inval, &v->tb_inval_cap, i);
        return 1;
    }
    return 0;
}

void vmlab_code_page_written(vmlab_vcpu *v, uint64_t paddr)
{
    const uint64_t pfn = paddr >> 12;
    if (!vmlab_is_ram(v, paddr, 1))
        return;
    v->page_flags[pfn] &= ~VMLAB_PAGE_CODE;
    v->page_gen[pfn]++;
    v->stat_code_writes++;
    /* Blocks whose bytes lie on this page are stale (QEMU drops its TBs on the
     * same store); forget their cached instruction counts too. */
    struct priv *p = v->priv;
    const uint64_t page = pfn << 12;
    /* The registry blocks that start on this page (a list through
     * tb_page_next), and every block that crosses a page boundary. */
    int dropped = 0;
    for (uint32_t k = p->page_tbs[pfn], n = 0; k && n <= v->ntbs; k = p->tb_page_next[k - 1], n++)
        if (tb_invalidate(v, k - 1, page, 0)) {
            icache_forget(v, p, k - 1);
            dropped = 1;
        }
    for (uint32_t k = 0; k < p->ntb_span; k++)
        dropped |= tb_invalidate(v, p->tb_span[k], page, 1);
    /* icache entries exist only for registry blocks (block_icount), each in
     * the slot of its pc: the dropped blocks' entries go above, and when any
     * went, the entries of every block that crosses a page boundary too (an
     * entry knows the physical page of its first byte only: conservative).
     * (This was a scan of the whole icache -- 512 KiB -- on every store to
     * code: a guest patching its code spent most of its time in it.) */
    for (uint32_t k = 0; dropped && k < p->ntb_span; k++)
        icache_forget(v, p, p->tb_span[k]);
}

/* A host-side write to guest RAM (device DMA, a loader, the debugger): the
 * pages that held code lose their blocks as after a CPU store, and Unicorn's
 * translations are dropped before the vCPU runs again (QEMU invalidates its
 * translations on DMA the same way; Unicorn cannot drop them by physical
 * address, so all go).  Returns 1 if a code page was hit. */
int vmlab_phys_written(vmlab_vcpu *v, uint64_t gpa, uint64_t len)
{
    struct priv *p = v->priv;
    if (!p || !len)
        return 0;
    uint64_t end = gpa + len;
    if (end < gpa)
        end = ~0ull;
    int hit = 0;
    for (uint64_t pg = gpa & ~0xfffull; pg < end && pg >= (gpa & ~0xfffull); pg += 4096) {
        if (!vmlab_is_ram(v, pg, 1))
            continue;
        if (v->page_flags[pg >> 12] & VMLAB_PAGE_CODE) {
            vmlab_code_page_written(v, pg);
            hit = 1;
        }
    }
    if (hit)
        p->tb_flush_pending = 1;
    return hit;
}

/* A page code is fetched from: stores to it are watched (vmlab_code_page_written). */
static inline void mark_code_page(vmlab_vcpu *v, uint64_t ppage)
{
    v->page_flags[ppage >> 12] |= VMLAB_PAGE_CODE;
}

/* ---- hooks ------------------------------------------------------------------- */
static bool hook_tlb_fill(uc_engine *uc, uint64_t vaddr, uc_mem_type type, uc_tlb_entry *e, void *ud)
{
    vmlab_vcpu *v = ud;
    struct priv *p = v->priv;
    uint32_t access = type == UC_MEM_WRITE ? VMLAB_ACC_WRITE : type == UC_MEM_FETCH ? VMLAB_ACC_FETCH : 0;
    uint32_t flags = VMLAB_WALK_SET_AD;
    vmlab_walk w;
    v->stat_fills++;
    if (__builtin_expect(v->env_cs_flags != 0 && v->env != NULL, 1)) {
        /* A task switch Unicorn runs itself (JMP/CALL to a TSS or task gate, IRET
         * with NT) loads the new task's selectors with empty caches, then their
         * descriptors.  A fill in between (after its CR3 load flushed the TLB)
         * makes Unicorn 2.1.4 re-execute the switching instruction in the new
         * task (docs/platform-notes.md).  CS with no flags in protected mode
         * happens nowhere else: stop, and emu/taskswitch.py finishes the switch. */
        uint32_t csf;
        memcpy(&csf, v->env + v->env_cs_flags, 4);
        if (__builtin_expect(csf == 0, 0) && (v->cr0 & 1)) {
            v->stop_kind = VMLAB_STOP_TASK_SWITCH;
            return false;
        }
    }
    if (v->cr0 & (1ull << 31)) {
        int cpl = current_cpl(v, p);
        if (cpl == 3)
            access |= VMLAB_ACC_USER;
        if (v->cr4 & (1ull << 21)) {   /* SMAP: EFLAGS.AC matters */
            uint64_t fl = 0;
            api.reg_read(uc, UC_X86_REG_EFLAGS, &fl);
            if (fl & (1u << 18))
                flags |= VMLAB_WALK_AC;
        }
    }
    if (__builtin_expect(v->redirect_on, 0) && (vaddr & ~0xfffull) == v->redirect_vpage
        && !(access & VMLAB_ACC_FETCH)) {
        /* Replaying one instruction whose operand is MMIO: its page is a
         * scratch page that holds the device's value (emu/cpu.py replay_mmio). */
        e->paddr = v->redirect_ppage;
        e->perms = (uc_prot)(VMLAB_PROT_R | VMLAB_PROT_W);
        return true;
    }
    if ((v->efer & (1ull << 10)) && (v->cr0 & (1ull << 31))) {
        /* IA-32e: a non-canonical linear address is #GP(0) (#SS(0) for stack
         * references) before any paging check (SDM Vol. 3A 3.3.7.1); Unicorn
         * does not check it for data accesses. */
        const unsigned bits = (v->cr4 & (1ull << 12)) ? 57 : 48;
        const uint64_t top = vaddr >> (bits - 1);
        if (top != 0 && top != (~0ull >> (bits - 1))) {
            v->stop_kind = VMLAB_STOP_NONCANONICAL;
            v->fault_vaddr = vaddr;
            v->fault_access = access;
            return false;
        }
    }
    /* Software TLB in front of the walk (SDM Vol. 3A 4.10): a translation that
     * already grants this access is reused without walking.  Entries are made
     * only from successful walks, after A (and D when W is granted) were set,
     * and are flushed on every CR0/CR3/CR4/EFER write, INVLPG and EPT change
     * (flushing more than the SDM requires is always allowed). */
    const uint64_t tag = (vaddr & ~0xfffull) | ((access & VMLAB_ACC_USER) ? 2 : 0)
                         | ((flags & VMLAB_WALK_AC) ? 4 : 0) | 1;
    struct stlb_entry *te = &p->stlb[((vaddr >> 12) ^ (vaddr >> 25)) & (STLB_SIZE - 1)];
    const uint32_t need = (access & VMLAB_ACC_WRITE) ? VMLAB_PROT_W : (access & VMLAB_ACC_FETCH) ? VMLAB_PROT_X
                                                                                           : VMLAB_PROT_R;
    int r;
    if (te->tag == tag && te->gen == p->stlb_gen && (te->perms & need)) {
        v->stat_stlb_hits++;
        memset(&w, 0, sizeof w);
        w.paddr = te->paddr;
        w.perms = te->perms;
        r = VMLAB_OK;
    } else {
        r = vmlab_walk_do(v, vaddr, access, flags, &w);
        if (r == VMLAB_OK) {
            te->tag = tag;
            te->gen = p->stlb_gen;
            te->paddr = w.paddr & ~0xfffull;
            te->perms = w.perms;
        }
    }
    if (r == VMLAB_FAULT_PF) {
        v->stat_fill_faults++;
        v->stop_kind = VMLAB_STOP_PAGE_FAULT;
        v->fault_vaddr = vaddr;
        v->fault_access = access;
        v->fault_error_code = w.error_code;
        return false;
    }
    if (r == VMLAB_FAULT_BUS) {
        v->stat_mmio++;
        v->stop_kind = VMLAB_STOP_MMIO;
        v->fault_vaddr = vaddr;
        v->fault_paddr = w.paddr & ~0xfffull;
        v->fault_access = access;
        return false;
    }
    if (r == VMLAB_FAULT_EPT_VIOLATION || r == VMLAB_FAULT_EPT_MISCONFIG) {
        /* Only with v->ept_enabled (a nested guest): the VM exit is Python's. */
        v->stop_kind = r == VMLAB_FAULT_EPT_VIOLATION ? VMLAB_STOP_EPT_VIOLATION
                                                      : VMLAB_STOP_EPT_MISCONFIG;
        v->fault_vaddr = vaddr;
        v->fault_access = access;
        v->fault_ept_gpa = w.gpa;
        v->fault_ept_qualification = w.ept_qualification;
        return false;
    }
    const uint64_t ppage = w.paddr & ~0xfffull;
    uint32_t perms = w.perms;
    uint8_t *pf = &v->page_flags[ppage >> 12];
    if (access & VMLAB_ACC_FETCH) {
        mark_code_page(v, ppage);
        perms &= ~VMLAB_PROT_W;
    } else if (*pf & VMLAB_PAGE_CODE) {
        if (access & VMLAB_ACC_WRITE) {
            /* First store to a page code was fetched from.  The store has
             * not happened yet: queue the page for a rescan at the next block
             * boundary (hook_block_slow; no stop from here, see hook_block).
             * The entry keeps X: with Unicorn 2.1.4 an exec-only entry followed
             * by a write-only one for the same page loses QEMU's own
             * self-modifying-code invalidation (a stale TB runs; seen with a
             * store to a function after pushes to its page). */
            vmlab_code_page_written(v, ppage);
            if (p->nrescan < RESCAN_MAX) {
                p->rescan[p->nrescan].vpage = vaddr & ~0xfffull;
                p->rescan[p->nrescan].ppage = ppage;
                p->nrescan++;
            } else {
                p->rescan_overflow = 1;
            }
            p->fast_deadline = 0;    /* hook_block: take the slow path at the next block */
            p->host_slow = 1;
        } else {
            perms &= ~VMLAB_PROT_W;
        }
    } else {
        /* A data page not (or no longer) known to hold code: without X, so
         * that the first fetch from it comes through here and marks it (a
         * fetch through an entry a read made would leave it unmarked, and a
         * later store to the code would go unseen). */
        perms &= ~VMLAB_PROT_X;
    }
    /* Debugger: physical-breakpoint aliases, watched pages (native/debug.c). */
    if (__builtin_expect(v->dbg != NULL, 0) && vmlab_dbg_fill(v, uc, vaddr, ppage, access, &perms))
        return false;
    e->paddr = ppage;
    e->perms = (uc_prot)perms;
    return true;
}

#define HF_DECODE_MASK 0xC0F3u   /* CPL, CS32, SS32, ADDSEG, PE, LMA, CS64 */

static uint32_t tb_hash(uint64_t pc, uint64_t paddr, uint32_t hf, uint32_t size)
{
    return hash64(pc ^ (paddr << 17) ^ ((uint64_t)hf << 40) ^ ((uint64_t)size << 52));
}

static void tbhash_rebuild(vmlab_vcpu *v, struct priv *p, uint32_t cap)
{
    free(p->tbhash);
    p->tbhash_cap = cap;
    p->tbhash = calloc(cap, sizeof(uint32_t));
    for (uint32_t i = 0; i < v->ntbs; i++) {
        const vmlab_tb *t = &v->tbs[i];
        uint32_t k = tb_hash(t->pc, t->paddr, t->hflags, t->size) & (cap - 1);
        while (p->tbhash[k]) k = (k + 1) & (cap - 1);
        p->tbhash[k] = i + 1;
    }
}

/* The registry entry of a block, or -1 (then *slot, if given, is the free
 * hash slot where it would go). */
static int64_t tb_find(vmlab_vcpu *v, struct priv *p, uint64_t pc, uint64_t paddr, uint32_t hf, uint32_t size,
                       uint32_t *slot)
{
    hf &= HF_DECODE_MASK;
    uint32_t k = tb_hash(pc, paddr, hf, size) & (p->tbhash_cap - 1);
    while (p->tbhash[k]) {
        const vmlab_tb *t = &v->tbs[p->tbhash[k] - 1];
        if (t->pc == pc && t->paddr == paddr && t->hflags == hf && t->size == size)
            return p->tbhash[k] - 1;
        k = (k + 1) & (p->tbhash_cap - 1);
    }
    if (slot)
        *slot = k;
    return -1;
}

/* Find or add the registry entry of a block seen for the first time (or again
 * after an invalidation); logs discoveries for -d in_asm. */
static uint32_t tb_register(vmlab_vcpu *v, struct priv *p, uint64_t pc, uint64_t paddr,
                            uint32_t hf, uint32_t size, uint32_t ninsn)
{
    uint32_t k = 0;
    const int64_t found = tb_find(v, p, pc, paddr, hf, size, &k);
    hf &= HF_DECODE_MASK;
    if (found >= 0) {
        vmlab_tb *t = &v->tbs[found];
        if (!t->valid) {
            t->valid = 1;
            t->ninsn = ninsn;
            t->translations++;
            v->stat_tb_translations++;
            push_u32(&v->tb_new, &v->ntb_new, &v->tb_new_cap, (uint32_t)found);
        }
        return (uint32_t)found;
    }
    if (v->ntbs == v->tbs_cap) {
        v->tbs_cap = v->tbs_cap ? v->tbs_cap * 2 : 1024;
        v->tbs = realloc(v->tbs, sizeof(vmlab_tb) * v->tbs_cap);
    }
    uint32_t idx = v->ntbs++;
    vmlab_tb *t = &v->tbs[idx];
    memset(t, 0, sizeof *t);
    if (v->ntbs > p->tb_page_next_cap) {
        p->tb_page_next_cap = v->tbs_cap;
        p->tb_page_next = realloc(p->tb_page_next, sizeof(uint32_t) * p->tb_page_next_cap);
    }
    p->tb_page_next[idx] = 0;
    if (vmlab_is_ram(v, paddr, 1)) {
        if (((paddr & 0xfff) + size) > 4096)
            push_u32(&p->tb_span, &p->ntb_span, &p->tb_span_cap, idx);
        else {
            p->tb_page_next[idx] = p->page_tbs[paddr >> 12];
            p->page_tbs[paddr >> 12] = idx + 1;
        }
    }
    t->pc = pc; t->paddr = paddr; t->hflags = hf; t->size = size; t->ninsn = ninsn;
    t->valid = 1; t->translations = 1;
    v->stat_tb_translations++;
    p->tbhash[k] = idx + 1;
    if (v->ntbs * 2 > p->tbhash_cap)
        tbhash_rebuild(v, p, p->tbhash_cap * 2);
    push_u32(&v->tb_new, &v->ntb_new, &v->tb_new_cap, idx);
    return idx;
}

/* -d exec / exec counts: one more run of registry block tb. */
static inline void note_exec(vmlab_vcpu *v, uint32_t tb)
{
    if (__builtin_expect(v->count_exec | v->log_exec, 0)) {
        v->tbs[tb].exec_count++;
        if (v->log_exec)
            push_u32(&v->exec_log, &v->nexec_log, &v->exec_log_cap, tb);
    }
}

static inline void icache_fill(struct icache_entry *ce, uint64_t pc, uint32_t size, int mode, uint32_t ninsn,
                               uint64_t paddr, uint32_t hfm, uint32_t tb)
{
    ce->pc = pc;
    ce->size_mode = (size << 2) | (uint32_t)mode;
    ce->ninsn = ninsn;
    ce->ppage = paddr & ~0xfffull;
    ce->hf = hfm;
    ce->tb = tb;
}

/* Address and length of the i-th entry of cs_disasm's cs_insn array. */
static inline void cs_insn_at(const void *insn, size_t i, uint64_t *addr, uint16_t *len)
{
    const uint8_t *e = (const uint8_t *)insn + i * VMLAB_CS_INSN_SIZE;
    memcpy(addr, e + VMLAB_CS_INSN_ADDRESS, sizeof *addr);
    memcpy(len, e + VMLAB_CS_INSN_LEN, sizeof *len);
}

/* Arm the trap sites of a block at its first run (again after a store to its
 * page or a change of the armed kinds): the instruction starts Capstone found
 * in buf[0..size) (buf holds got >= size bytes: the block and up to 15 past it), plus every offset of a tail Capstone could not decode
 * (conservative).  A new site's translated block is dropped so that Unicorn
 * translates it again with the site's code hook.  Returns the number of new
 * sites: the caller stops before the block runs. */
static int arm_block_sites(vmlab_vcpu *v, struct priv *p, uint64_t pc, const uint8_t *buf, uint32_t size,
                           uint32_t got, const uint8_t *insn, size_t cnt, int mode_bits)
{
    uint32_t starts[64], sites[64];
    uint32_t covered = 0;
    int added = 0;
    size_t i = 0;
    v->stat_blocks_classified++;
    /* Bounded: Unicorn walks its hook list for every instruction it
     * translates, so a guest that keeps making new code with trapped
     * instructions in it (a JIT) must not grow the list without end.  Past
     * the bound every site goes and blocks arm theirs again as they run. */
    if (v->nexits >= VMLAB_MAX_SITES) {
        sites_reset(v, p, p->uc);
        v->stat_sites_resets++;
    }
    while (i < cnt || covered < size) {
        uint32_t n = 0;
        for (; i < cnt && n < 64; i++) {
            uint64_t a;
            uint16_t len;
            cs_insn_at(insn, i, &a, &len);
            if (a - pc >= size)
                break;
            starts[n++] = (uint32_t)(a - pc);
            covered = (uint32_t)(a - pc) + len;
        }
        if (n == 0) {
            /* past what Capstone decoded: every remaining offset */
            cnt = i;
            for (; covered < size && n < 64; covered++)
                starts[n++] = covered;
            if (n == 0)
                break;
        }
        const int k = vmlab_block_sites(buf, got, starts, n, mode_bits, v->trap_kinds, sites, NULL, 64);
        for (int j = 0; j < k; j++) {
            const uint64_t a = pc + sites[j];
            if (exit_add(v, p, a)) {
                api.ctl(p->uc, UC_CTL_WRITE(UC_CTL_TB_REMOVE_CACHE, 2), a, a + 1);
                added++;
            }
        }
    }
    return added;
}

/* The block's instruction count (icache, else Capstone), registering it; at its
 * first run arms its trap sites, *armed = how many are new. */
static uint32_t block_icount(vmlab_vcpu *v, struct priv *p, uint64_t pc, uint32_t size, int *armed)
{
    /* Hot path (every block): one direct-mapped probe, no multiply. */
    struct icache_entry *ce = &p->icache[(pc ^ (pc >> 13)) & (ICACHE_SIZE - 1)];
    const uint32_t hfm = read_hflags(v, p) & HF_DECODE_MASK;
    *armed = 0;
    if (__builtin_expect(ce->pc == pc && (ce->size_mode >> 2) == size && ce->hf == hfm, 1)) {
        note_exec(v, ce->tb);
        return ce->ninsn;
    }
    v->stat_icount_misses++;
    uint32_t hf = read_hflags(v, p);
    int mode = (hf & HF_CS64_MASK) ? 2 : (hf & HF_CS32_MASK) ? 1 : 0;
    /* The block's bytes are read as the CPU fetched them: at its CPL (an
     * implicit supervisor read of user code would fault under SMAP), no A/D. */
    const uint32_t facc = VMLAB_ACC_FETCH | ((hf & HF_CPL_MASK) == 3 ? VMLAB_ACC_USER : 0);
    {
        /* Seen before (the icache is direct-mapped and small): the registry
         * has its count, and its sites are armed if its sites_gen is current;
         * no need to decode it again. */
        vmlab_walk w0;
        if (vmlab_walk_do(v, pc, facc, 0, &w0) == VMLAB_OK) {
            const int64_t idx = tb_find(v, p, pc, w0.paddr, hf, size, NULL);
            if (idx >= 0 && v->tbs[idx].valid && v->tbs[idx].sites_gen == v->sites_gen) {
                icache_fill(ce, pc, size, mode, v->tbs[idx].ninsn, w0.paddr, hfm, (uint32_t)idx);
                note_exec(v, ce->tb);
                return ce->ninsn;
            }
        }
    }
    uint32_t n = 0;
    uint8_t buf[4096 + 32];
    uint32_t got = 0;
    uint64_t paddr = ~0ull;
    /* Fetch the block's bytes through the soft-MMU (no A/D side effects), and
     * up to 15 bytes past it: a block that ends in an instruction the CPU
     * refuses (a VMX instruction is #UD to Unicorn) covers only part of it. */
    const uint32_t want = size + 15 < sizeof buf ? size + 15 : (uint32_t)sizeof buf;
    while (got < want) {
        vmlab_walk w;
        if (vmlab_walk_do(v, pc + got, facc, 0, &w) != VMLAB_OK)
            break;
        if (got == 0)
            paddr = w.paddr;
        uint32_t chunk = 4096 - (uint32_t)((pc + got) & 0xfff);
        if (chunk > want - got) chunk = want - got;
        memcpy(buf + got, v->ram + w.paddr, chunk);
        got += chunk;
    }
    void *insn = NULL;
    size_t cnt = 0;
    if (got >= size && p->cs_handle[mode]) {
        /* The count is of the instructions wholly inside the block (a partly
         * covered last one does not run); sites are looked for at every start
         * inside it. */
        cnt = api.cs_disasm(p->cs_handle[mode], buf, got, pc, 0, &insn);
        for (size_t i = 0; i < cnt; i++) {
            uint64_t a;
            uint16_t len;
            cs_insn_at(insn, i, &a, &len);
            if (a - pc + len > size)
                break;
            n++;
        }
    }
    if (n == 0)
        n = size / 3 + 1;   /* undecodable: a deterministic estimate */
    icache_fill(ce, pc, size, mode, n, paddr, hfm, tb_register(v, p, pc, paddr, hf, size, n));
    vmlab_tb *t = &v->tbs[ce->tb];
    if (t->sites_gen != v->sites_gen) {
        /* Bytes the walk could not fetch (the block's page went away since it
         * was translated) are not classified: the block is not run from them. */
        if (got >= size && v->trap_kinds)
            *armed = arm_block_sites(v, p, pc, buf, size, got, insn, cnt, 16 << mode);
        t->sites_gen = v->sites_gen;
    }
    if (insn)
        api.cs_free(insn, cnt);
    note_exec(v, ce->tb);
    return n;
}

/* Code pages were written since the last block boundary (the stores are done
 * now).  Their blocks were dropped from the registry (vmlab_code_page_written);
 * drop Unicorn's translations of them too (with the TLB fill hook, QEMU's own
 * self-modifying-code detection misses stores that reach a code page through
 * an entry the fill handed out for writing: a function patched after it ran
 * kept running its old bytes, guests/smc.asm).  They are classified again when
 * they next run (block_icount).
 *
 * The page was written through rescan[i].vpage, which need not be a linear
 * address code runs from: Linux's text_poke() writes kernel text through a
 * second, non-executable (XD) mapping.  Dropping translations by a linear
 * range makes Unicorn translate it as a fetch (get_page_addr_code), which the
 * fill refuses for a non-executable alias: a bogus #PF with a fetch error code.
 * So only executable linear pages are dropped here (the walk sets no A/D bits);
 * code run through another alias of the page is dropped by QEMU when it looks
 * the block up by physical page... or runs stale, as on a CPU without the
 * cross-modifying-code serialisation the SDM asks for (Vol. 3A 9.1.3).
 *
 * Last, the written pages were handed out with W: take it back so the next
 * store to them comes through the fill again. */
static void drop_written_code(vmlab_vcpu *v, struct priv *p)
{
    const uint32_t xacc = VMLAB_ACC_FETCH | (current_cpl(v, p) == 3 ? VMLAB_ACC_USER : 0);
    if (p->rescan_overflow) {
        api.ctl(p->uc, UC_CTL_WRITE(UC_CTL_TB_FLUSH, 0));
    } else {
        for (uint32_t i = 0; i < p->nrescan; i++) {
            vmlab_walk xw;
            const uint64_t vpage = p->rescan[i].vpage;
            if ((v->cr0 & (1ull << 31)) && vmlab_walk_do(v, vpage, xacc, 0, &xw) != VMLAB_OK)
                continue;
            api.ctl(p->uc, UC_CTL_WRITE(UC_CTL_TB_REMOVE_CACHE, 2), vpage, vpage + 4096);
        }
    }
    p->nrescan = 0;
    p->rescan_overflow = 0;
    api.ctl(p->uc, UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0));
}

/* ---- the block hook ------------------------------------------------------------
 *
 * Unicorn calls the UC_HOOK_BLOCK callback at the start of every translated block
 * it executes (a direct call compiled into the block).  With the virtual clock it
 * is the instruction counter, so it runs ~10^8 times a second: its common path is
 * one compare against fast_deadline, one direct-mapped icache probe keyed by
 * (pc, size, decoding hflags) and an add.  Everything rare (deadline reached,
 * irq window armed, code pages to rescan, block logs near full, exec counting or
 * logging, hflags location unknown) is folded into fast_deadline = 0 by
 * refresh_fast(), which sends every block to hook_block_slow(), the complete
 * check.  refresh_fast() runs at each vmlab_run() and at the end of each slow
 * call; the TLB fill zeroes fast_deadline itself when it queues a rescan.
 *
 * Measured on a 5-instruction loop block that takes ~5 ns in Unicorn without
 * hooks: the call itself (an empty callback) costs ~1.7-2 ns, this common path
 * ~0.3-0.6 ns more (the previous hook, with calls and far loads, ~4 ns).
 *
 * With the host clock (vmlab_set_clock) the hook is hook_block_host: no counting,
 * only a test of host_stop (set by the timer thread at the deadline) and
 * host_slow (rare conditions, as above).  A block hook is kept there because
 * stopping a running engine from another thread is not safe with Unicorn 2.1.4:
 * uc_emu_stop's request is also honoured at the check Unicorn compiles after each
 * guest memory access, and an exit there restarts the instruction whose store
 * already happened (an "add [mem], 1" is executed twice).  A stop requested from
 * a block hook takes effect before the block's first instruction. */

static void refresh_fast(vmlab_vcpu *v, struct priv *p)
{
    p->hf_ptr = v->env ? (const volatile uint32_t *)(v->env + v->env_hflags) : NULL;
    const int rare = v->irq_window | v->log_exec | p->nrescan | p->rescan_overflow
                     | (p->hf_ptr == NULL) | (v->nexec_log >= 65536) | (v->ntb_new >= 65536)
                     | (v->dbg != NULL && (v->dbg->async_stop | v->dbg->break_mode));
    p->fast_deadline = rare ? 0 : v->icount_deadline;
    p->host_slow = rare | p->want_blocks;
}

static void __attribute__((noinline)) hook_block_slow(uc_engine *uc, uint64_t addr, uint32_t size,
                                                      vmlab_vcpu *v, struct priv *p)
{
    if (__builtin_expect(v->dbg != NULL, 0) && vmlab_dbg_block(v, uc))
        return;      /* a debugger stop (native/debug.c): before the block runs */
    if (p->nrescan | p->rescan_overflow)
        drop_written_code(v, p);
    /* A stop requested here takes effect before the block runs (Unicorn checks
     * right after the block hook), so the block is only counted when it runs:
     * the deadline is checked before adding it (a block may overshoot it). */
    if (v->nexec_log >= 65536 || v->ntb_new >= 65536) {
        v->stop_kind = VMLAB_STOP_LOG_FULL;
        api.emu_stop(uc);
        return;
    }
    if (p->clock_host ? p->host_stop != 0 : v->icount >= v->icount_deadline) {
        v->stop_kind = VMLAB_STOP_DEADLINE;
        api.emu_stop(uc);
        return;
    }
    if (v->irq_window) {
        uint64_t fl = 0;
        api.reg_read(uc, UC_X86_REG_EFLAGS, &fl);
        /* IF=1 and not in an STI / MOV SS interrupt shadow (QEMU keeps it in
         * hflags; the block right after STI holds one instruction). */
        if ((fl & 0x200) && !(read_hflags(v, p) & (1u << 3))) {
            v->stop_kind = VMLAB_STOP_IRQ_WINDOW;
            api.emu_stop(uc);
            return;
        }
    }
    int armed;
    const uint32_t n = block_icount(v, p, addr, size, &armed);
    refresh_fast(v, p);
    if (armed) {
        /* Not run, not counted: translated again with its new sites. */
        v->stop_kind = VMLAB_STOP_SITES;
        api.emu_stop(uc);
        return;
    }
    if (!p->clock_host)
        v->icount += (uint64_t)n << v->icount_shift;
}

static void __attribute__((noinline)) hook_block_miss(uc_engine *uc, vmlab_vcpu *v, struct priv *p,
                                                      uint64_t addr, uint32_t size)
{
    int armed;
    const uint32_t n = block_icount(v, p, addr, size, &armed);
    if (v->ntb_new >= 65536) {
        p->fast_deadline = 0;   /* the discovery log must be drained: next block stops */
        p->host_slow = 1;
    }
    if (armed) {
        v->stop_kind = VMLAB_STOP_SITES;
        api.emu_stop(uc);
        return;
    }
    if (!p->clock_host)
        v->icount += (uint64_t)n << v->icount_shift;   /* virtual ns (-icount shift) */
}

static void hook_block(uc_engine *uc, uint64_t addr, uint32_t size, void *ud)
{
    vmlab_vcpu *v = ud;
    struct priv *p = v->priv;
    if (__builtin_expect(v->icount >= p->fast_deadline, 0)) {
        hook_block_slow(uc, addr, size, v, p);
        return;
    }
    const struct icache_entry *ce = &p->icache[(addr ^ (addr >> 13)) & (ICACHE_SIZE - 1)];
    const uint32_t hfm = *p->hf_ptr & HF_DECODE_MASK;
    if (__builtin_expect(ce->pc == addr && (ce->size_mode >> 2) == size && ce->hf == hfm, 1)) {
        v->icount += (uint64_t)ce->ninsn << v->icount_shift;   /* virtual ns (-icount shift) */
        if (__builtin_expect(v->count_exec, 0))
            v->tbs[ce->tb].exec_count++;                        /* per-block execution counts (TbCache) */
        return;
    }
    hook_block_miss(uc, v, p, addr, size);
}

static void hook_block_host(uc_engine *uc, uint64_t addr, uint32_t size, void *ud)
{
    vmlab_vcpu *v = ud;
    struct priv *p = v->priv;
    if (__builtin_expect(p->host_stop | p->host_slow, 0)) {
        hook_block_slow(uc, addr, size, v, p);
        return;
    }
    /* The icache probe only (no counting): a miss is a block's first run,
     * where its trap sites are armed. */
    const struct icache_entry *ce = &p->icache[(addr ^ (addr >> 13)) & (ICACHE_SIZE - 1)];
    const uint32_t hfm = *p->hf_ptr & HF_DECODE_MASK;
    if (__builtin_expect(ce->pc == addr && (ce->size_mode >> 2) == size && ce->hf == hfm, 1)) {
        if (__builtin_expect(v->count_exec, 0))
            v->tbs[ce->tb].exec_count++;
        return;
    }
    hook_block_miss(uc, v, p, addr, size);
}

static void hook_site(uc_engine *uc, uint64_t addr, uint32_t size, void *ud)
{
    vmlab_vcpu *v = ud;
    vmlab_walk w;
    (void)size;
    if (__builtin_expect(v->dbg != NULL, 0) && vmlab_dbg_break_hit(v, uc, addr))
        return;      /* a breakpoint on a trap site stops as a breakpoint */
    struct priv *pp = v->priv;
    if (__builtin_expect(addr == pp->pass_site, 0)) {
        pp->pass_site = ~0ull;  /* vmlab_step_past_site: this one runs */
        return;
    }
    v->stop_kind = VMLAB_STOP_TRAP;
    v->fault_vaddr = addr;
    /* Where the site's bytes are, and their page's write generation: Python
     * caches the decoded instruction under (linear, physical, generation). */
    if (vmlab_walk_do(v, addr, 0, VMLAB_WALK_IMPLICIT_SUP, &w) == VMLAB_OK) {
        v->fault_paddr = w.paddr;
        v->fault_error_code = v->page_gen[w.paddr >> 12];
    } else {
        v->fault_paddr = ~0ull;
    }
    api.emu_stop(uc);
}

static void hook_intr(uc_engine *uc, uint32_t intno, void *ud)
{
    vmlab_vcpu *v = ud;
    v->stop_kind = VMLAB_STOP_EXCEPTION;
    v->intno = intno;
    api.emu_stop(uc);
}

/* SYSCALL / SYSENTER: Unicorn 2.1.4 runs neither (its helpers call the
 * UC_HOOK_INSN hooks, then only step EIP past the instruction).  Record the
 * instruction's address (EIP still points at it while the hook runs) and stop;
 * both end their translated block, so the engine stops right after, and
 * Python rewinds RIP and completes the instruction (emu/sensitive.py). */
static void hook_sysinsn(vmlab_vcpu *v, uint32_t which)
{
    struct priv *p = v->priv;
    uint64_t rip = 0;
    api.reg_read(p->uc, UC_X86_REG_RIP, &rip);
    v->stop_kind = VMLAB_STOP_SYSINSN;
    v->intno = which;
    v->fault_vaddr = rip;
    api.emu_stop(p->uc);
}

static void hook_syscall(uc_engine *uc, void *ud) { (void)uc; hook_sysinsn(ud, 0); }
static void hook_sysenter(uc_engine *uc, void *ud) { (void)uc; hook_sysinsn(ud, 1); }

static int hook_cpuid(uc_engine *uc, void *ud)
{
    vmlab_vcpu *v = ud;
    uint64_t rax = 0, rcx = 0;
    /* CPUX86State.regs[] directly (RAX, RCX, RDX, RBX = regs[0..3], the
     * layout verified at start-up) instead of six uc_reg_read/write calls
     * through the API layer (CPUID loop iteration measured 140 -> 95 ns).
     * What is left is Unicorn's: its helper restores the guest state from the
     * host PC (cpu_restore_state) before calling any UC_HOOK_INSN hook. */
    uint64_t *gpr = (uint64_t *)v->env;
    if (gpr) {
        rax = gpr[0];
        rcx = gpr[1];
    } else {
        api.reg_read(uc, UC_X86_REG_RAX, &rax);
        api.reg_read(uc, UC_X86_REG_RCX, &rcx);
    }
    uint32_t leaf = (uint32_t)rax, sub = (uint32_t)rcx;
    /* SDM CPUID: a basic leaf above the maximum returns the highest basic
     * leaf's data (Intel behaviour); unknown extended leaves likewise. */
    if (leaf < 0x80000000u ? leaf > v->cpuid_max_basic : leaf > v->cpuid_max_ext)
        leaf = v->cpuid_max_basic;
    uint64_t out[4] = {0, 0, 0, 0};
    for (uint32_t k = 0; k < v->ncpuid; k++) {
        const vmlab_cpuid_entry *c = &v->cpuid[k];
        if (c->leaf == leaf && (!(c->flags & 1) || c->subleaf == sub)) {
            out[0] = c->eax; out[1] = c->ebx; out[2] = c->ecx; out[3] = c->edx;
            break;
        }
    }
    if (gpr) {
        gpr[0] = out[0]; gpr[3] = out[1]; gpr[1] = out[2]; gpr[2] = out[3];
        return 1;
    }
    api.reg_write(uc, UC_X86_REG_RAX, &out[0]);
    api.reg_write(uc, UC_X86_REG_RBX, &out[1]);
    api.reg_write(uc, UC_X86_REG_RCX, &out[2]);
    api.reg_write(uc, UC_X86_REG_RDX, &out[3]);
    return 1;
}

static uint64_t host_now(const struct priv *p);

static int hook_rdtsc(uc_engine *uc, void *ud)
{
    vmlab_vcpu *v = ud;
    const struct priv *p = v->priv;
    /* TSC = virtual time in ns + offset; with the host clock, read it now. */
    uint64_t tsc = (p->clock_host ? host_now(p) : v->icount) + v->tsc_offset;
    uint64_t lo = (uint32_t)tsc, hi = tsc >> 32;
    uint64_t *gpr = (uint64_t *)v->env;     /* regs[0] = RAX, regs[2] = RDX */
    if (gpr) {
        gpr[0] = lo; gpr[2] = hi;
        return 1;
    }
    api.reg_write(uc, UC_X86_REG_RAX, &lo);
    api.reg_write(uc, UC_X86_REG_RDX, &hi);
    return 1;
}

static int hook_rdtscp(uc_engine *uc, void *ud)
{
    vmlab_vcpu *v = ud;
    uint64_t aux = v->tsc_aux;
    hook_rdtsc(uc, ud);
    if (v->env)
        ((uint64_t *)v->env)[1] = aux;      /* regs[1] = RCX */
    else
        api.reg_write(uc, UC_X86_REG_RCX, &aux);
    return 1;
}

/* capstone's cs_close, handed over on its own (emu/native.py) so that
 * vmlab_vcpu_fini releases the three disassembler handles (~76 KiB each). */
typedef int (*fn_cs_close)(size_t *);
static fn_cs_close cs_close_fn;

void vmlab_set_cs_close(void *cs_close)
{
    cs_close_fn = (fn_cs_close)cs_close;
}

/* QEMU's cpu_cc_compute_all (target/i386/cc_helper.c), exported by Unicorn:
 * the arithmetic flags of the lazy condition-code state (emu/native.py). */
typedef uint32_t (*fn_cc_compute_all)(void *env, int op);
static fn_cc_compute_all cc_compute_all_fn;

void vmlab_set_cc_compute_all(void *fn)
{
    cc_compute_all_fn = (fn_cc_compute_all)fn;
}

/* ---- life cycle --------------------------------------------------------------- */
int vmlab_vcpu_init(vmlab_vcpu *v, void *uc, uint8_t *ram, uint64_t ram_size, uint64_t ram_high)
{
    /* Per-page arrays cover every RAM page frame number, the hole's included
     * when there is RAM above 4 GiB (calloc'd: untouched pages cost nothing). */
    const uint64_t span = ram_high ? 0x100000000ull + ram_high : ram_size;
    struct priv *p = calloc(1, sizeof *p);
    if (!p)
        return -1;
    v->priv = p;
    p->uc = uc;
    p->pass_site = ~0ull;
    v->ram = ram;
    v->ram_size = ram_size;
    v->ram_high = ram_high;
    v->icount_deadline = ~0ull;
    v->page_flags = calloc(span >> 12, 1);
    v->page_gen = calloc(span >> 12, sizeof(uint32_t));
    p->page_tbs = calloc(span >> 12, sizeof(uint32_t));
    if (!v->page_flags || !v->page_gen || !p->page_tbs)
        return -1;
    p->stlb_gen = 1;
    if (api.ctx_alloc(uc, &p->ctx) != UC_ERR_OK)
        return -2;
    /* capstone: CS_ARCH_X86 = 3, CS_MODE_16 = 1<<1, CS_MODE_32 = 1<<2, CS_MODE_64 = 1<<3 */
    if (api.cs_open) {
        api.cs_open(3, 1 << 1, &p->cs_handle[0]);
        api.cs_open(3, 1 << 2, &p->cs_handle[1]);
        api.cs_open(3, 1 << 3, &p->cs_handle[2]);
    }
    exitset_rebuild(v, p, 1024);
    v->sites_gen = 1;
    for (uint32_t k = 0; k < ICACHE_SIZE; k++)
        p->icache[k].pc = ~0ull;
    tbhash_rebuild(v, p, 2048);
    return 0;
}

void vmlab_vcpu_fini(vmlab_vcpu *v)
{
    struct priv *p = v->priv;
    if (!p)
        return;
    if (p->ctx) api.ctx_free(p->ctx);
    for (int k = 0; k < 3; k++)
        if (p->cs_handle[k] && cs_close_fn)
            cs_close_fn(&p->cs_handle[k]);
    free(p->exitset);
    free(p->site_hooks);
    free(p->tbhash);
    free(p->page_tbs);
    free(p->tb_page_next);
    free(p->tb_span);
    free(v->tbs); free(v->tb_new); free(v->tb_inval); free(v->exec_log);
    v->tbs = NULL; v->tb_new = v->tb_inval = v->exec_log = NULL;
    free(v->exits);
    free(v->page_flags);
    free(v->page_gen);
    free(p);
    v->priv = NULL;
    v->exits = NULL;
    v->page_flags = NULL;
    v->page_gen = NULL;
}

int vmlab_attach(vmlab_vcpu *v, void *uc)
{
    uc_hook h;
    uc_err err;
    if ((err = api.hook_add(uc, &h, UC_HOOK_TLB_FILL, (void *)hook_tlb_fill, v, 1, 0)))
        return 100 + err;
    if ((err = api.hook_add(uc, &h, UC_HOOK_BLOCK, (void *)hook_block, v, 1, 0)))
        return 200 + err;
    ((struct priv *)v->priv)->block_hook = h;
    if ((err = api.hook_add(uc, &h, UC_HOOK_INTR, (void *)hook_intr, v, 1, 0)))
        return 300 + err;
    if ((err = api.hook_add(uc, &h, UC_HOOK_INSN, (void *)hook_cpuid, v, 1, 0, UC_X86_INS_CPUID)))
        return 400 + err;
    if ((err = api.hook_add(uc, &h, UC_HOOK_INSN, (void *)hook_rdtsc, v, 1, 0, UC_X86_INS_RDTSC)))
        return 500 + err;
    if ((err = api.hook_add(uc, &h, UC_HOOK_INSN, (void *)hook_rdtscp, v, 1, 0, UC_X86_INS_RDTSCP)))
        return 600 + err;
    if ((err = api.hook_add(uc, &h, UC_HOOK_INSN, (void *)hook_syscall, v, 1, 0, UC_X86_INS_SYSCALL)))
        return 700 + err;
    if ((err = api.hook_add(uc, &h, UC_HOOK_INSN, (void *)hook_sysenter, v, 1, 0, UC_X86_INS_SYSENTER)))
        return 800 + err;
    return 0;
}

/* ---- bulk register transfer --------------------------------------------------- */
static const int gpr_ids[16] = {
    UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX,
    UC_X86_REG_RSP, UC_X86_REG_RBP, UC_X86_REG_RSI, UC_X86_REG_RDI,
    UC_X86_REG_R8, UC_X86_REG_R9, UC_X86_REG_R10, UC_X86_REG_R11,
    UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14, UC_X86_REG_R15,
};

/* Segment caches, LDTR, TR, hflags and the pending exception's error code,
 * from a CPUX86State image at d (offsets as in a context). */
static void regs_read_segments(const vmlab_vcpu *v, const uint8_t *d, vmlab_regs *r)
{
    for (int s = 0; s < 6; s++) {
        const uint8_t *src = d + v->ctx_segs + 24 * s;
        memcpy(&r->seg[s].selector, src, 4);
        memcpy(&r->seg[s].base, src + 8, 8);
        memcpy(&r->seg[s].limit, src + 16, 4);
        memcpy(&r->seg[s].flags, src + 20, 4);
    }
    memcpy(&r->ldtr.selector, d + v->ctx_ldt, 4);
    memcpy(&r->ldtr.base, d + v->ctx_ldt + 8, 8);
    memcpy(&r->ldtr.limit, d + v->ctx_ldt + 16, 4);
    memcpy(&r->ldtr.flags, d + v->ctx_ldt + 20, 4);
    memcpy(&r->tr.selector, d + v->ctx_tr, 4);
    memcpy(&r->tr.base, d + v->ctx_tr + 8, 8);
    memcpy(&r->tr.limit, d + v->ctx_tr + 16, 4);
    memcpy(&r->tr.flags, d + v->ctx_tr + 20, 4);
    memcpy(&r->hflags, d + v->ctx_hflags, 4);
    memcpy(&r->error_code, d + v->ctx_error_code, 4);
    memcpy(&r->exception_is_int, d + v->ctx_is_int, 4);
}

int vmlab_regs_read(vmlab_vcpu *v, void *uc, vmlab_regs *r)
{
    struct priv *p = v->priv;
    if (v->env && v->ctx_cr && cc_compute_all_fn) {
        /* In place from the live CPUX86State (offsets checked by the start-up
         * self-test, emu/qemu_state.py), where the API would copy the same
         * fields one reg_read at a time (37 of them: ~0.5 us).  RFLAGS is
         * what the API computes too (QEMU's cpu_compute_eflags): the stored
         * flags, the arithmetic flags of the lazy condition-code state
         * (cc_op), and DF (df is +1/-1). */
        const uint8_t *d = v->env - v->ctx_env;
        const uint8_t *e = v->env;
        uint64_t eflags;
        uint32_t lim, cc_op;
        int32_t df;
        memcpy(&eflags, e + 136, 8);            /* CPUX86State.eflags */
        memcpy(&cc_op, e + 168, 4);             /* .cc_op */
        memcpy(&df, e + 172, 4);                /* .df */
        r->rflags = eflags | cc_compute_all_fn(v->env, (int)cc_op) | ((uint32_t)df & 0x400);
        memcpy(&r->cr8, d + v->ctx_cr + 64, 8);
        memcpy(&r->kernel_gs_base, d + v->ctx_kernel_gs_base, 8);
        memcpy(r->gpr, v->env, sizeof r->gpr);
        memcpy(&r->rip, d + v->ctx_eip, 8);
        memcpy(&r->cr0, d + v->ctx_cr, 8);
        memcpy(&r->cr2, d + v->ctx_cr + 16, 8);
        memcpy(&r->cr3, d + v->ctx_cr + 24, 8);
        memcpy(&r->cr4, d + v->ctx_cr + 32, 8);
        memcpy(&r->gdtr_base, d + v->ctx_gdt + 8, 8);
        memcpy(&lim, d + v->ctx_gdt + 16, 4);
        r->gdtr_limit = lim & 0xFFFF;           /* the API keeps 16 bits (reg_write truncates) */
        memcpy(&r->idtr_base, d + v->ctx_gdt + 24 + 8, 8);
        memcpy(&lim, d + v->ctx_gdt + 24 + 16, 4);
        r->idtr_limit = lim & 0xFFFF;
        memcpy(&r->efer, d + v->ctx_efer, 8);
        memcpy(&r->dr[0], d + v->ctx_dr, 32);  /* dr0-dr3 */
        memcpy(&r->dr[6], d + v->ctx_dr + 48, 16);  /* dr6, dr7 */
        regs_read_segments(v, d, r);
        r->fs_base = r->seg[4].base;            /* what the API reads for FS_BASE/GS_BASE */
        r->gs_base = r->seg[5].base;
        return 0;
    }
    int ids[40];
    void *vals[40];
    int n = 0;
    uc_x86_mmr gdtr, idtr;
    uc_x86_msr efer = {0xC0000080u, 0}, kgs = {0xC0000102u, 0};
    for (int k = 0; k < 16; k++) { ids[n] = gpr_ids[k]; vals[n++] = &r->gpr[k]; }
    ids[n] = UC_X86_REG_RIP; vals[n++] = &r->rip;
    ids[n] = UC_X86_REG_RFLAGS; vals[n++] = &r->rflags;
    ids[n] = UC_X86_REG_CR0; vals[n++] = &r->cr0;
    ids[n] = UC_X86_REG_CR2; vals[n++] = &r->cr2;
    ids[n] = UC_X86_REG_CR3; vals[n++] = &r->cr3;
    ids[n] = UC_X86_REG_CR4; vals[n++] = &r->cr4;
    ids[n] = UC_X86_REG_CR8; vals[n++] = &r->cr8;
    ids[n] = UC_X86_REG_FS_BASE; vals[n++] = &r->fs_base;
    ids[n] = UC_X86_REG_GS_BASE; vals[n++] = &r->gs_base;
    ids[n] = UC_X86_REG_GDTR; vals[n++] = &gdtr;
    ids[n] = UC_X86_REG_IDTR; vals[n++] = &idtr;
    ids[n] = UC_X86_REG_MSR; vals[n++] = &efer;
    ids[n] = UC_X86_REG_MSR; vals[n++] = &kgs;
    ids[n] = UC_X86_REG_DR0; vals[n++] = &r->dr[0];
    ids[n] = UC_X86_REG_DR1; vals[n++] = &r->dr[1];
    ids[n] = UC_X86_REG_DR2; vals[n++] = &r->dr[2];
    ids[n] = UC_X86_REG_DR3; vals[n++] = &r->dr[3];
    ids[n] = UC_X86_REG_DR6; vals[n++] = &r->dr[6];
    ids[n] = UC_X86_REG_DR7; vals[n++] = &r->dr[7];
    memset(&gdtr, 0, sizeof gdtr);
    memset(&idtr, 0, sizeof idtr);
    uc_err err = api.reg_read_batch(uc, ids, vals, n);
    if (err)
        return err;
    r->gdtr_base = gdtr.base; r->gdtr_limit = gdtr.limit;
    r->idtr_base = idtr.base; r->idtr_limit = idtr.limit;
    r->efer = efer.value;
    r->kernel_gs_base = kgs.value;
    /* Segment caches, hflags and the pending exception's error code live only
     * in QEMU's CPUX86State: read them in place when its address is known (a
     * context has the same layout), else from one context save. */
    uint8_t *d;
    if (v->env) {
        d = v->env - v->ctx_env;
    } else {
        if (api.ctx_save(uc, p->ctx) != UC_ERR_OK)
            return -1;
        d = ctx_data(p);
    }
    regs_read_segments(v, d, r);
    return 0;
}

/* mask bits: 0-15 gpr[k], 16 rip, 17 rflags, 18 cr2, 19 fs_base, 20 gs_base,
 * 21 kernel_gs_base, 22 gdtr, 23 idtr, 24 dr0-3/6/7.  CR0/3/4 and EFER go
 * through Python (they change modes and must be checked). */
int vmlab_regs_write(vmlab_vcpu *v, void *uc, const vmlab_regs *r, uint64_t mask)
{
    (void)v;
    int ids[40];
    void *vals[40];
    int n = 0;
    uc_x86_mmr gdtr = {0, r->gdtr_base, r->gdtr_limit, 0}, idtr = {0, r->idtr_base, r->idtr_limit, 0};
    uc_x86_msr kgs = {0xC0000102u, r->kernel_gs_base};
    for (int k = 0; k < 16; k++)
        if (mask & (1ull << k)) { ids[n] = gpr_ids[k]; vals[n++] = (void *)&r->gpr[k]; }
    if (mask & (1ull << 17)) { ids[n] = UC_X86_REG_RFLAGS; vals[n++] = (void *)&r->rflags; }
    if (mask & (1ull << 18)) { ids[n] = UC_X86_REG_CR2; vals[n++] = (void *)&r->cr2; }
    if (mask & (1ull << 19)) { ids[n] = UC_X86_REG_FS_BASE; vals[n++] = (void *)&r->fs_base; }
    if (mask & (1ull << 20)) { ids[n] = UC_X86_REG_GS_BASE; vals[n++] = (void *)&r->gs_base; }
    if (mask & (1ull << 21)) { ids[n] = UC_X86_REG_MSR; vals[n++] = &kgs; }
    if (mask & (1ull << 22)) { ids[n] = UC_X86_REG_GDTR; vals[n++] = &gdtr; }
    if (mask & (1ull << 23)) { ids[n] = UC_X86_REG_IDTR; vals[n++] = &idtr; }
    if (mask & (1ull << 24)) {
        static const int dr_ids[6] = {UC_X86_REG_DR0, UC_X86_REG_DR1, UC_X86_REG_DR2,
                                      UC_X86_REG_DR3, UC_X86_REG_DR6, UC_X86_REG_DR7};
        static const int dr_idx[6] = {0, 1, 2, 3, 6, 7};
        for (int k = 0; k < 6; k++) { ids[n] = dr_ids[k]; vals[n++] = (void *)&r->dr[dr_idx[k]]; }
    }
    /* RIP last: Unicorn treats a RIP write as "restart here". */
    if (mask & (1ull << 16)) { ids[n] = UC_X86_REG_RIP; vals[n++] = (void *)&r->rip; }
    if (!n)
        return 0;
    return api.reg_write_batch(uc, ids, vals, n);
}

/* Load segment caches (and hflags bits) the API cannot write: CS/SS with a new
 * CPL for event delivery, or the whole set for a loader's entry state.  Also
 * clears QEMU's "exception in flight" (old_exception = -1), which Unicorn
 * leaves stale after handing an exception to UC_HOOK_INTR and which would turn
 * the next fault into a bogus #DF. */
int vmlab_env_set_segs(vmlab_vcpu *v, void *uc, const vmlab_regs *r, uint32_t seg_mask,
                       uint32_t hflags_mask, uint32_t hflags_val, int clear_exception)
{
    struct priv *p = v->priv;
    uint8_t *d;
    const int live = v->env != NULL;   /* write the live CPU state directly (not running now) */
    if (live) {
        d = v->env - v->ctx_env;
    } else {
        if (api.ctx_save(uc, p->ctx) != UC_ERR_OK)
            return -1;
        d = ctx_data(p);
    }
    for (int s = 0; s < 6; s++) {
        if (!(seg_mask & (1u << s)))
            continue;
        uint8_t *dst = d + v->ctx_segs + 24 * s;
        memcpy(dst, &r->seg[s].selector, 4);
        memcpy(dst + 8, &r->seg[s].base, 8);
        memcpy(dst + 16, &r->seg[s].limit, 4);
        memcpy(dst + 20, &r->seg[s].flags, 4);
    }
    if (seg_mask & (1u << 6)) {
        uint8_t *dst = d + v->ctx_ldt;
        memcpy(dst, &r->ldtr.selector, 4); memcpy(dst + 8, &r->ldtr.base, 8);
        memcpy(dst + 16, &r->ldtr.limit, 4); memcpy(dst + 20, &r->ldtr.flags, 4);
    }
    if (seg_mask & (1u << 7)) {
        uint8_t *dst = d + v->ctx_tr;
        memcpy(dst, &r->tr.selector, 4); memcpy(dst + 8, &r->tr.base, 8);
        memcpy(dst + 16, &r->tr.limit, 4); memcpy(dst + 20, &r->tr.flags, 4);
    }
    if (hflags_mask) {
        uint32_t hf;
        memcpy(&hf, d + v->ctx_hflags, 4);
        hf = (hf & ~hflags_mask) | (hflags_val & hflags_mask);
        memcpy(d + v->ctx_hflags, &hf, 4);
    }
    if (clear_exception) {
        int32_t none = -1;
        memcpy(d + v->ctx_old_exception, &none, 4);
    }
    if (live)
        return 0;
    return api.ctx_restore(uc, p->ctx) == UC_ERR_OK ? 0 : -1;
}

/* Drop every cached translation in Unicorn's soft TLB (CR3/CR0/CR4/EFER
 * changes, INVLPG): the next access of each page comes back through the fill. */
void vmlab_tlb_flush(void *uc)
{
    api.ctl(uc, UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0));
}

/* Forget every registered block (after the reset stub, which is not the guest's). */
void vmlab_tb_reset(vmlab_vcpu *v)
{
    struct priv *p = v->priv;
    v->ntbs = v->ntb_new = v->ntb_inval = v->nexec_log = 0;
    v->stat_tb_translations = v->stat_tb_invalidations = 0;
    tbhash_rebuild(v, p, p->tbhash_cap);
    memset(p->page_tbs, 0, sizeof(uint32_t) * ((v->ram_high ? 0x100000000ull + v->ram_high : v->ram_size) >> 12));
    p->ntb_span = 0;
    for (uint32_t k = 0; k < ICACHE_SIZE; k++)
        p->icache[k].pc = ~0ull;
}

void vmlab_set_emu_start(void *emu_start)
{
    api.emu_start = (fn_emu_start)emu_start;
}

/* uc_emu_start without the Python binding's ctypes overhead; returns uc_err. */
int vmlab_emu_start(void *uc, uint64_t begin)
{
    return api.emu_start(uc, begin, 0, 0, 0);
}

/* Execute exactly one instruction (Unicorn's count=1 path), also when the
 * block hook first stopped to arm trap sites in its block (v may be NULL: no
 * such retry). */
int vmlab_emu_step(vmlab_vcpu *v, void *uc, uint64_t begin)
{
    if (v == NULL)
        return api.emu_start(uc, begin, 0, 0, 1);
    return run_sites(v, uc, begin, 1);
}

/* Execute the instruction at begin natively although it is an armed trap site
 * (linear address site): its hook lets it run once.  A trap kind that VM-exits
 * only for some operands (a far JMP/CALL switches tasks only through a TSS or
 * task gate, emu/taskswitch.py) runs so when it does not exit, without
 * disarming the kind (which would drop every translated block).  For an
 * instruction that ends its translation block (a far JMP/CALL does): with the
 * virtual clock the run is one block long (the deadline one instruction
 * ahead), not a count=1 run, after which Unicorn 2.1.4 drops every
 * translated block when the next run counts nothing. */
int vmlab_step_past_site(vmlab_vcpu *v, void *uc, uint64_t begin, uint64_t site)
{
    struct priv *p = v->priv;
    int err;
    p->pass_site = site;
    if (!p->clock_host) {
        const uint64_t deadline = v->icount_deadline;
        v->icount_deadline = v->icount + 1;
        refresh_fast(v, p);
        err = run_sites(v, uc, begin, 0);
        v->icount_deadline = deadline;
        refresh_fast(v, p);
    } else {
        err = run_sites(v, uc, begin, 1);
    }
    p->pass_site = ~0ull;
    return err;
}

/* ---- clock modes and the run entry point ---------------------------------------
 *
 * Virtual clock (default): virtual time is the instruction count, kept exact per
 * block by hook_block; a run stops before the first block that starts at or past
 * icount_deadline.
 *
 * Host clock: virtual time is CLOCK_MONOTONIC minus origin_ns (1 ns units, like
 * the virtual clock).  icount_deadline is a time; one process-wide timer thread
 * sets the vCPU's host_stop flag when it passes, and hook_block_host stops the
 * engine at the next block boundary.  v->icount is set to the current time when
 * a run returns.  No instruction is counted. */

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t host_now(const struct priv *p)
{
    const uint64_t t = mono_ns();
    return t > p->origin_ns ? t - p->origin_ns : 0;
}

uint64_t vmlab_host_now(vmlab_vcpu *v)
{
    return host_now(v->priv);
}

/* The timer thread: the list holds the armed timers only (a run arms its vCPU's
 * timer before uc_emu_start and unlinks it right after), so a freed vCPU is never
 * on it.  The thread never calls into Unicorn: it only sets flags. */
static pthread_mutex_t tm_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t tm_cv;
static struct host_timer *tm_list;
static uint64_t tm_wake = ~0ull;   /* when the thread wakes up next (~0: not before a signal) */
static int tm_started;

static void *tm_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&tm_mu);
    for (;;) {
        const uint64_t now = mono_ns();
        uint64_t next = ~0ull;
        for (struct host_timer *t = tm_list; t; t = t->next) {
            if (t->when <= now)
                __atomic_store_n(t->flag, 1, __ATOMIC_RELEASE);
            else if (t->when < next)
                next = t->when;
        }
        tm_wake = next;
        if (next == ~0ull) {
            pthread_cond_wait(&tm_cv, &tm_mu);
        } else {
            struct timespec ts = {(time_t)(next / 1000000000ull), (long)(next % 1000000000ull)};
            pthread_cond_timedwait(&tm_cv, &tm_mu, &ts);
        }
    }
    return NULL;
}

static void tm_atfork_child(void)
{
    /* The thread does not exist in a forked child: start a new one on demand. */
    pthread_mutex_init(&tm_mu, NULL);
    tm_list = NULL;
    tm_wake = ~0ull;
    tm_started = 0;
}

static int tm_start_locked(void)
{
    static int atfork_done;
    pthread_condattr_t ca;
    pthread_attr_t ta;
    pthread_t th;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&tm_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_attr_init(&ta);
    pthread_attr_setdetachstate(&ta, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&ta, 64 << 10);
    const int err = pthread_create(&th, &ta, tm_main, NULL);
    pthread_attr_destroy(&ta);
    if (err)
        return -1;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, tm_atfork_child);
        atfork_done = 1;
    }
    tm_started = 1;
    return 0;
}

static int tm_arm(struct host_timer *t, volatile uint32_t *flag, uint64_t when)
{
    pthread_mutex_lock(&tm_mu);
    if (!tm_started && tm_start_locked()) {
        pthread_mutex_unlock(&tm_mu);
        return -1;
    }
    t->when = when;
    t->flag = flag;
    if (!t->linked) {
        t->next = tm_list;
        tm_list = t;
        t->linked = 1;
    }
    /* Wake the thread only if it would sleep past this deadline. */
    if (when < tm_wake) {
        tm_wake = when;
        pthread_cond_signal(&tm_cv);
    }
    pthread_mutex_unlock(&tm_mu);
    return 0;
}

static void tm_disarm(struct host_timer *t)
{
    pthread_mutex_lock(&tm_mu);
    if (t->linked) {
        for (struct host_timer **pp = &tm_list; *pp; pp = &(*pp)->next)
            if (*pp == t) {
                *pp = t->next;
                break;
            }
        t->linked = 0;
    }
    pthread_mutex_unlock(&tm_mu);
}

/* Switch the clock: host != 0 selects the host clock with virtual time 0 at
 * CLOCK_MONOTONIC = origin_ns.  Swaps the block hook (hook_block counts,
 * hook_block_host does not) and drops every translated block, which has the
 * old hook's call compiled in.  Returns 0 or a uc_err. */
int vmlab_set_clock(vmlab_vcpu *v, void *uc, int host, uint64_t origin_ns)
{
    struct priv *p = v->priv;
    uc_err err;
    uc_hook h = 0;
    host = host != 0;
    p->origin_ns = origin_ns;
    if (host == (int)p->clock_host)
        return 0;
    if (p->block_hook)
        api.hook_del(uc, p->block_hook);
    p->block_hook = 0;
    p->clock_host = (uint32_t)host;
    p->host_stop = 0;
    err = api.hook_add(uc, &h, UC_HOOK_BLOCK, host ? (void *)hook_block_host : (void *)hook_block, v, 1, 0);
    if (err)
        return err;
    p->block_hook = h;
    api.ctl(uc, UC_CTL_WRITE(UC_CTL_TB_FLUSH, 0));
    refresh_fast(v, p);
    return 0;
}

/* Run the vCPU from begin until a stop (what and why: v->stop_kind) or, with
 * flags & 1, for one instruction.  flags & 2: the block registry must see every
 * block (logs, exec counts) even with the host clock.  Returns uc_err. */
/* emu_start, again while a block's first run armed trap sites in it (it
 * stopped before the block ran; it is translated again with them).  A block
 * arms its sites once, so this ends; a bound keeps it from spinning anyway. */
static int run_sites(vmlab_vcpu *v, void *uc, uint64_t begin, size_t count)
{
    struct priv *p = v->priv;
    if (p->tb_flush_pending) {
        p->tb_flush_pending = 0;
        api.ctl(uc, UC_CTL_WRITE(UC_CTL_TB_FLUSH, 0));
        api.ctl(uc, UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0));
    }
    for (int tries = 0;; tries++) {
        const int err = api.emu_start(uc, begin, 0, 0, count);
        if (err || v->stop_kind != VMLAB_STOP_SITES)
            return err;
        v->stop_kind = VMLAB_STOP_NONE;
        if (tries == 64) {
            v->stop_kind = VMLAB_STOP_REQUEST;     /* Python runs again */
            return 0;
        }
        refresh_fast(v, v->priv);
        api.reg_read(uc, UC_X86_REG_RIP, &begin);
    }
}

int vmlab_run(vmlab_vcpu *v, void *uc, uint64_t begin, uint32_t flags)
{
    struct priv *p = v->priv;
    const size_t count = (flags & 1) ? 1 : 0;
    p->want_blocks = (flags >> 1) & 1;
    refresh_fast(v, p);
    if (!p->clock_host)
        return run_sites(v, uc, begin, count);
    int err = 0;
    p->host_stop = 0;
    const uint64_t now = host_now(p);
    if (now >= v->icount_deadline && !count) {
        /* Like the virtual clock: a deadline already passed stops before the
         * first block.  RIP is still set to begin, as emu_start would: the
         * caller may have left a RIP-only change unwritten (Vcpu.run). */
        api.reg_write(uc, UC_X86_REG_RIP, &begin);
        v->stop_kind = VMLAB_STOP_DEADLINE;
        v->icount = now;
        return 0;
    }
    const int timed = !count && v->icount_deadline != ~0ull;
    if (timed && tm_arm(&p->timer, &p->host_stop, p->origin_ns + v->icount_deadline))
        return UC_ERR_RESOURCE;
    err = run_sites(v, uc, begin, count);
    if (timed)
        tm_disarm(&p->timer);
    p->host_stop = 0;
    v->icount = host_now(p);
    return err;
}

/* Make the block hook take its slow path at the next block boundary (where
 * the debugger's stop requests are checked).  Safe from another thread: it only
 * stores flags; a refresh_fast racing with it may undo the first store, so a
 * caller waiting for the stop repeats the request. */
void vmlab_request_slow_path(vmlab_vcpu *v)
{
    struct priv *p = v->priv;
    __atomic_store_n(&p->fast_deadline, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&p->host_slow, 1, __ATOMIC_RELEASE);
}

/* Drop every software-TLB entry (CR writes, INVLPG, EPT changes; the Unicorn TLB
 * is flushed separately by vmlab_tlb_flush). */
void vmlab_stlb_flush(vmlab_vcpu *v)
{
    struct priv *p = v->priv;
    if (++p->stlb_gen == 0) {            /* wrapped: the old entries must not match again */
        memset(p->stlb, 0, sizeof p->stlb);
        p->stlb_gen = 1;
    }
    v->stat_stlb_flushes++;
}

/* ---- VM-exit fast path -----------------------------------------------------------
 * The policy-only VM exits decided at the trap site, in C (vmlab.h "fast path";
 * the Python twin is emu/fastpath.py and tests compare the two). */

/* One bit of an I/O bitmap in guest RAM; a bitmap outside RAM reads as 0 (the
 * Python policy does the same). */
static int io_bitmap_bit(const vmlab_fastpath *f, const uint8_t *ram, uint64_t ram_size, uint32_t port)
{
    const uint64_t base = port < 0x8000 ? f->io_bitmap_a : f->io_bitmap_b;
    const uint32_t bit = port & 0x7fff;
    const uint64_t addr = base + bit / 8;
    if (addr < base || addr >= ram_size)
        return 0;
    return (ram[addr] >> (bit & 7)) & 1;
}

/* Does RDMSR/WRMSR of ECX = msr VM-exit under the MSR bitmaps (SDM Vol. 3C
 * 25.6.9: read-low at +0, read-high (C0000000H-C0001FFFH) at +400H, then the
 * write halves at +800H and +C00H; an MSR outside both ranges, or a bitmap
 * outside RAM, exits)? */
static int msr_bitmap_exits(const vmlab_fastpath *f, const uint8_t *ram, uint64_t ram_size, uint32_t msr,
                            int write)
{
    uint64_t off;
    uint32_t bit;
    if (msr <= 0x1fff) {
        off = 0; bit = msr;
    } else if (msr >= 0xc0000000u && msr <= 0xc0001fffu) {
        off = 0x400; bit = msr - 0xc0000000u;
    } else {
        return 1;
    }
    off += write ? 0x800 : 0;
    const uint64_t addr = f->msr_bitmap + off + bit / 8;
    if (addr < f->msr_bitmap || addr >= ram_size)
        return 1;
    return (ram[addr] >> (bit & 7)) & 1;
}

/* MOV to/from CR (0F 22 /r, 0F 20 /r) under f's CR policy: 1 = a VM exit
 * (f->exit_* filled), 0 = not decided here.  Exit qualification for
 * control-register accesses, SDM Vol. 3C Table 28-3: bits 3:0 the CR, 5:4 the
 * access type (0 MOV to CR, 1 MOV from CR), 11:8 the general register. */
static int fast_decide_cr(const vmlab_insn *c, int mode, const uint64_t *gpr, vmlab_fastpath *f)
{
    const uint32_t cr = ((c->rex >> 2) & 1) << 3 | ((c->modrm >> 3) & 7);
    const uint32_t g = (c->rex & 1) << 3 | (c->modrm & 7);
    const int write = c->kind == VMLAB_TRAP_CR_WRITE;
    int exits = 0;
    if (cr == 8 && mode != 64)
        return 0;                                   /* #UD: CR8 exists in 64-bit mode only */
    if (write) {
        const uint64_t value = mode == 64 ? gpr[g] : (gpr[g] & 0xffffffffull);
        if (cr == 0)
            exits = ((value ^ f->cr0_shadow) & f->cr0_mask) != 0;
        else if (cr == 4)
            exits = ((value ^ f->cr4_shadow) & f->cr4_mask) != 0;
        else if (cr == 3 && (f->cr_ctl & VMLAB_CR3_LOAD)) {
            exits = 1;
            for (uint32_t i = 0; i < f->cr3_count && i < 4; i++)
                if (value == f->cr3_target[i])
                    exits = 0;
        } else if (cr == 8)
            exits = (f->cr_ctl & VMLAB_CR8_LOAD) != 0;
        else
            return 0;                               /* CR2 never exits; others #UD */
    } else {
        if (cr == 3)
            exits = (f->cr_ctl & VMLAB_CR3_STORE) != 0;
        else if (cr == 8)
            exits = (f->cr_ctl & VMLAB_CR8_STORE) != 0;
        else
            return 0;                               /* reads of CR0/CR4 are emulated (the shadow) */
    }
    if (!exits)
        return 0;
    f->exit_reason = 28;   /* control-register accesses (SDM Vol. 3C Appendix C) */
    f->exit_len = c->length;
    f->exit_qual = (uint64_t)cr | ((uint64_t)(write ? 0 : 1) << 4) | ((uint64_t)g << 8);
    f->hits++;
    return 1;
}

int vmlab_cr_value(uint32_t cr, int write, uint64_t src, int mode, uint32_t hflags, uint64_t cr0, uint64_t cr3,
                   uint64_t cr4, uint64_t efer, uint32_t cs_flags, const vmlab_fastpath *f, uint64_t *out)
{
    /* CR0: PE 0, ET 4, NW 29, CD 30, PG 31; the bits MOV keeps (emu/x86.py CR0_VALID) */
    const uint64_t PE = 1, ET = 1u << 4, NW = 1u << 29, CD = 1u << 30, PG = 1ull << 31;
    const uint64_t CR0_VALID = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | (1u << 16) | (1u << 18) | NW | CD | PG;
    const uint64_t PAE = 1u << 5, LA57 = 1u << 12, PCIDE = 1u << 17, LME = 1u << 8, LMA = 1u << 10;
    if (!f->cr_emulate || (hflags & HF_CPL_MASK) || (hflags & (1u << 3)))
        return 0;                                   /* CPL > 0 (#GP), or an STI / MOV SS shadow to end */
    if (!write) {
        uint64_t v;
        if (cr == 0)
            v = (cr0 & ~f->cr0_mask) | (f->cr0_shadow & f->cr0_mask);   /* SDM Vol. 3C 26.3: the shadow */
        else if (cr == 4)
            v = (cr4 & ~f->cr4_mask) | (f->cr4_shadow & f->cr4_mask);
        else if (cr == 3)
            v = cr3;
        else
            return 0;
        *out = mode == 64 ? v : (v & 0xffffffffull);
        return 2;
    }
    uint64_t v = mode == 64 ? src : (src & 0xffffffffull);
    const int lma = (efer & LMA) != 0;
    if (cr == 0) {
        /* SDM Vol. 2B MOV, Vol. 3A 2.5 (the checks of emulate_cr) */
        if (v >> 32)
            return 0;
        v |= ET;
        if (((v & PG) && !(v & PE)) || ((v & NW) && !(v & CD)))
            return 0;
        if ((v & PG) && !(cr0 & PG) && (efer & LME) && (!(cr4 & PAE) || (cs_flags & (1u << 21))))
            return 0;
        if (lma && (hflags & HF_CS64_MASK) && !(v & PG))
            return 0;
        /* SDM Vol. 3C 26.3: the bits the guest/host mask owns are not modified */
        v = ((v & CR0_VALID) & ~f->cr0_mask) | (cr0 & f->cr0_mask);
        if ((v ^ cr0) & (PG | PE))
            return 0;
    } else if (cr == 4) {
        if ((v & ~f->cr4_valid) || (lma && !(v & PAE)))
            return 0;
        v = (v & ~f->cr4_mask) | (cr4 & f->cr4_mask);
        if ((v ^ cr4) & (PAE | PCIDE | LA57))
            return 0;
    } else if (cr == 3) {
        v &= ~(1ull << 63);                          /* PCID's no-flush bit is not kept */
        if (lma && f->maxphyaddr < 64 && (v >> f->maxphyaddr))
            return 0;
    } else {
        return 0;
    }
    *out = v;
    return 1;
}

/* The trap site the vCPU stopped at (fault_paddr): its bytes in RAM up to the
 * end of their page, at most 15 (*n; a straddling instruction is left to
 * Python, which walks the next page), QEMU's hflags and the code size (16,
 * 32, 64).  NULL: not in RAM, or no CPU state to read. */
static const uint8_t *site_bytes(vmlab_vcpu *v, uint32_t *n, uint32_t *hf, int *mode)
{
    const uint64_t pa = v->fault_paddr;
    if (pa == ~0ull || pa >= v->ram_size || !v->env)
        return NULL;
    uint32_t k = 4096 - (uint32_t)(pa & 0xfff);
    if (k > 15) k = 15;
    if (pa + k > v->ram_size) k = (uint32_t)(v->ram_size - pa);
    *n = k;
    *hf = read_hflags(v, v->priv);
    *mode = (*hf & HF_CS64_MASK) ? 64 : (*hf & HF_CS32_MASK) ? 32 : 16;
    return v->ram + pa;
}

/* After a paging register changed in Unicorn: every cached translation
 * dropped (vmlab's and Unicorn's), and v's copies of CR0, CR3, CR4 and EFER
 * read back (what the walker uses).  0 or the uc_err of the read. */
static int paging_changed(vmlab_vcpu *v, void *uc)
{
    vmlab_stlb_flush(v);
    vmlab_tlb_flush(uc);
    uc_x86_msr e = {0xC0000080u, 0};
    int rids[4] = {UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_CR4, UC_X86_REG_MSR};
    void *rvals[4] = {&v->cr0, &v->cr3, &v->cr4, &e};
    const int err = api.reg_read_batch(uc, rids, rvals, 4);
    if (!err)
        v->efer = e.value;
    return err;
}

/* RIP past a trap-site instruction of ``len`` bytes completed here, wrapped
 * at the code size (16, 32, 64). */
static inline void site_advance(vmlab_regs *r, uint32_t len, int mode)
{
    r->rip += len;
    if (mode != 64)
        r->rip &= mode == 32 ? 0xffffffffull : 0xffffull;
}

/* At a trap site the fast path did not decide: a MOV to/from CR0/CR3/CR4 that
 * does not VM-exit, completed here when vmlab_cr_value can (the write with
 * the side effects Vcpu.write_cr has: every cached translation dropped, the
 * paging copies synced; RIP past the instruction).  1: done, run on. */
static int cr_emulate_site(vmlab_vcpu *v, void *uc, vmlab_regs *r, vmlab_fastpath *f)
{
    uint32_t n, hf;
    int mode;
    /* RFLAGS.TF: the single-step #DB after the instruction is Python's */
    const uint8_t *code = f->cr_emulate && !(r->rflags & (1ull << 8)) ? site_bytes(v, &n, &hf, &mode) : NULL;
    if (!code)
        return 0;
    vmlab_insn c;
    if (vmlab_classify(code, n, mode, &c) < 0 || c.status != VMLAB_CLASS_TRAP
        || (c.kind != VMLAB_TRAP_CR_READ && c.kind != VMLAB_TRAP_CR_WRITE)
        || (c.prefixes & (VMLAB_PFX_LOCK | VMLAB_PFX_VEX)))
        return 0;
    const uint32_t cr = ((c.rex >> 2) & 1) << 3 | ((c.modrm >> 3) & 7);
    const uint32_t g = (c.rex & 1) << 3 | (c.modrm & 7);
    const int write = c.kind == VMLAB_TRAP_CR_WRITE;
    uint64_t val;
    const int what = vmlab_cr_value(cr, write, r->gpr[g], mode, hf, r->cr0, r->cr3, r->cr4, r->efer,
                                    r->seg[1].flags, f, &val);
    if (!what)
        return 0;
    if (what == 2) {
        if (api.reg_write(uc, gpr_ids[g], &val))
            return 0;
        r->gpr[g] = val;
    } else {
        static const int ids[5] = {UC_X86_REG_CR0, 0, 0, UC_X86_REG_CR3, UC_X86_REG_CR4};
        if (api.reg_write(uc, ids[cr], &val) || paging_changed(v, uc))
            return 0;
        r->cr0 = v->cr0; r->cr3 = v->cr3; r->cr4 = v->cr4;
    }
    /* Past the instruction (no interrupt shadow to end: vmlab_cr_value checked) */
    site_advance(r, c.length, mode);
    f->cr_emulated++;
    return 1;
}

int vmlab_pio_decide(const uint8_t *code, uint32_t n, uint32_t hflags, uint64_t rflags, uint64_t rax,
                     uint64_t rdx, const vmlab_pio *t, uint32_t *len, uint32_t *out)
{
    const uint32_t PE = 1u << 7, INHIBIT = 1u << 3;
    /* an STI/MOV SS shadow to end, or RFLAGS.TF: the single-step #DB after it */
    if (!t || n < 1 || (hflags & INHIBIT) || (rflags & (1ull << 8)))
        return 0;
    /* Protected mode with CPL > IOPL, or virtual-8086 mode: the TSS I/O
     * permission bitmap decides (SDM Vol. 1 19.5.1, 19.5.2) -- Python. */
    if ((hflags & PE) && ((rflags & (1ull << 17)) || (hflags & HF_CPL_MASK) > ((rflags >> 12) & 3)))
        return 0;
    const uint8_t op = code[0];
    uint32_t port, l;
    if (op == 0xE4 || op == 0xE6) {            /* IN AL, imm8 / OUT imm8, AL */
        if (n < 2)
            return 0;
        port = code[1];
        l = 2;
    } else if (op == 0xEC || op == 0xEE) {     /* IN AL, DX / OUT DX, AL */
        port = (uint32_t)(rdx & 0xFFFF);
        l = 1;
    } else {
        return 0;
    }
    const uint32_t np = t->nports < VMLAB_PIO_PORTS ? t->nports : VMLAB_PIO_PORTS;
    for (uint32_t k = 0; k < np; k++) {
        if (t->port[k] != port)
            continue;
        if (op == 0xE4 || op == 0xEC) {
            if (!t->read_ok[k])
                return 0;
            *len = l;
            *out = t->read_value[k];
            return 1;
        }
        if (!t->write_ok[k] || t->nqueued >= VMLAB_PIO_RING)
            return 0;
        *len = l;
        *out = port << 8 | (uint32_t)(rax & 0xFF);
        return 2;
    }
    return 0;
}

/* At a trap site the fast path did not decide: a 1-byte IN/OUT of a port the
 * coalesced port-I/O table serves, completed here (AL gets the byte, or the
 * OUT is queued; RIP past the instruction).  1: done, run on. */
static int pio_fast_site(vmlab_vcpu *v, void *uc, vmlab_regs *r, vmlab_fastpath *f)
{
    vmlab_pio *t = f->pio;
    uint32_t n, hf, len, out;
    int mode;
    const uint8_t *code = t ? site_bytes(v, &n, &hf, &mode) : NULL;
    if (!code)
        return 0;
    const int what = vmlab_pio_decide(code, n, hf, r->rflags, r->gpr[0], r->gpr[2], t, &len, &out);
    if (!what)
        return 0;
    if (what == 1) {
        uint64_t rax = (r->gpr[0] & ~0xFFull) | out;
        if (api.reg_write(uc, UC_X86_REG_RAX, &rax))
            return 0;
        r->gpr[0] = rax;
    } else {
        t->ring[t->nqueued++] = out;
    }
    site_advance(r, len, mode);
    t->completed++;
    return 1;
}

int vmlab_fast_decide_bytes(const uint8_t *code, uint32_t n, int mode, const uint64_t *gpr,
                            vmlab_fastpath *f, const uint8_t *ram, uint64_t ram_size, uint32_t priv)
{
    const uint64_t rcx = gpr[1], rdx = gpr[2];
    vmlab_insn c;
    f->exit_intr_info = 0;   /* no interruption information in the exits decided here */
    if (vmlab_classify(code, n, mode, &c) < 0 || c.status != VMLAB_CLASS_TRAP)
        return 0;
    /* LOCK or VEX: #UD, which has priority over any VM exit (left to Python). */
    if (c.prefixes & (VMLAB_PFX_LOCK | VMLAB_PFX_VEX))
        return 0;
    const uint32_t kind = (uint32_t)c.kind;
    /* SDM Vol. 3C 26.1.1: invalid-opcode exceptions, faults based on
     * privilege level and #GP from the TSS I/O permission bitmap come before
     * VM exits.  Where one may apply, Python decides (priority_fault). */
    const uint32_t cpl = priv & 3;
    if (kind == VMLAB_TRAP_XSETBV && !(priv & VMLAB_PRIV_OSXSAVE))
        return 0;                                   /* #UD: CR4.OSXSAVE = 0 */
    if (cpl) {
        switch (kind) {
        case VMLAB_TRAP_CPUID: case VMLAB_TRAP_PAUSE: case VMLAB_TRAP_IO:
            break;
        case VMLAB_TRAP_RDTSC: case VMLAB_TRAP_RDTSCP:
            if (priv & VMLAB_PRIV_TSD)
                return 0;
            break;
        case VMLAB_TRAP_RDPMC:
            if (!(priv & VMLAB_PRIV_PCE))
                return 0;
            break;
        default:
            return 0;                               /* needs CPL 0 (#GP), or MONITOR/MWAIT (#UD) */
        }
    }
    if (kind == VMLAB_TRAP_IO && (priv & VMLAB_PRIV_PE)
        && ((priv & VMLAB_PRIV_VM) || cpl > ((priv >> VMLAB_PRIV_IOPL_SHIFT) & 3)))
        return 0;                                   /* the TSS I/O bitmap decides first */
    if (kind < VMLAB_TRAP_COUNT && (f->exit_kinds >> kind) & 1) {
        f->exit_reason = f->reason[kind];
        f->exit_len = c.length;
        f->exit_qual = 0;
        f->hits++;
        return 1;
    }
    if ((kind == VMLAB_TRAP_RDMSR || kind == VMLAB_TRAP_WRMSR) && f->msr_mode != VMLAB_FAST_MSR_NONE) {
        const int write = kind == VMLAB_TRAP_WRMSR;
        if (f->msr_mode == VMLAB_FAST_MSR_BITMAPS &&
            !msr_bitmap_exits(f, ram, ram_size, (uint32_t)rcx, write))
            return 0;
        f->exit_reason = write ? 32 : 31;   /* WRMSR / RDMSR (SDM Vol. 3C Appendix C) */
        f->exit_len = c.length;
        f->exit_qual = 0;
        f->hits++;
        return 1;
    }
    if ((kind == VMLAB_TRAP_CR_READ || kind == VMLAB_TRAP_CR_WRITE) && f->cr_mode)
        return fast_decide_cr(&c, mode, gpr, f);
    if (kind != VMLAB_TRAP_IO || f->io_mode == VMLAB_FAST_IO_NONE || c.opmap != 0)
        return 0;
    /* IN/OUT with an immediate port (E4-E7) or DX (EC-EF); INS/OUTS (6C-6F)
     * need instruction information and a linear address: left to Python. */
    const uint8_t op = c.opcode;
    if (op < 0xe4 || (op > 0xe7 && op < 0xec) || op > 0xef)
        return 0;
    const int imm = op < 0xec;
    uint32_t port;
    if (imm) {
        if (c.nprefix + 1 >= n)
            return 0;
        port = code[c.nprefix + 1];
    } else {
        port = (uint32_t)(rdx & 0xffff);
    }
    uint32_t size = 1;
    if (op & 1) {
        /* operand size: 16-bit code defaults to 2, 32/64-bit to 4; 66h flips
         * (IN/OUT have no 8-byte form, SDM Vol. 2A IN/OUT) */
        const int o16 = (mode == 16) != ((c.prefixes & VMLAB_PFX_OPSIZE) != 0);
        size = o16 ? 2 : 4;
    }
    const int in = (op & 2) == 0;
    if (f->io_mode == VMLAB_FAST_IO_BITMAPS) {
        /* SDM Vol. 3C 26.1.3: exits if the bit of any port accessed is 1. */
        int exits = 0;
        for (uint32_t q = 0; q < size; q++)
            exits |= io_bitmap_bit(f, ram, ram_size, (port + q) & 0xffff);
        if (!exits)
            return 0;
    }
    /* Exit qualification for I/O instructions, SDM Vol. 3C Table 28-5: bits 2:0
     * size - 1, bit 3 direction (1 = IN), bit 4 string, bit 5 REP, bit 6 operand
     * encoding (1 = immediate), bits 31:16 port. */
    f->exit_reason = 30;   /* I/O instruction (SDM Vol. 3C Appendix C) */
    f->exit_len = c.length;
    f->exit_qual = (uint64_t)(size - 1) | ((uint64_t)in << 3) | ((uint64_t)imm << 6) | ((uint64_t)port << 16);
    f->hits++;
    return 1;
}

int vmlab_fast_decide(vmlab_vcpu *v, vmlab_fastpath *f)
{
    uint32_t n, hf;
    int mode;
    const uint8_t *code = site_bytes(v, &n, &hf, &mode);
    if (!code)
        return 0;
    uint64_t gpr[16];
    memcpy(gpr, v->env, sizeof gpr);     /* CPUX86State.regs[0..15] (RAX..R15) */
    uint64_t eflags;
    memcpy(&eflags, v->env + 136, 8);    /* CPUX86State.eflags: IOPL and VM are kept there */
    const uint32_t priv = (hf & HF_CPL_MASK) | ((v->cr4 & (1u << 2)) ? VMLAB_PRIV_TSD : 0)
        | ((v->cr4 & (1u << 8)) ? VMLAB_PRIV_PCE : 0) | (uint32_t)((eflags >> 12) & 3) << VMLAB_PRIV_IOPL_SHIFT
        | ((eflags & (1u << 17)) ? VMLAB_PRIV_VM : 0) | ((v->cr0 & 1) ? VMLAB_PRIV_PE : 0)
        | ((v->cr4 & (1u << 18)) ? VMLAB_PRIV_OSXSAVE : 0);
    return vmlab_fast_decide_bytes(code, n, mode, gpr, f, v->ram, v->ram_size, priv);
}

/* Exceptions under the exception bitmap (SDM Vol. 3C 26.2; the #PF rule with
 * the page-fault error-code mask and match, 25.6.3), as vmm/vmx_intercept.py
 * _exception decides them; the exiting case only, delivery stays Python's. */
int vmlab_fast_decide_exc(vmlab_fastpath *f, uint32_t vector, uint32_t sw, uint32_t error_code, uint64_t cr2)
{
    if (!f->exc_mode || vector >= 32)
        return 0;
    /* #DB (its exit qualification), NMI and #DF: left to Python. */
    if (vector == 1 || vector == 2 || vector == 8)
        return 0;
    /* INT n is a software interrupt, not an exception: never a VM exit by the
     * bitmap; INT3 (3) and INTO (4) are software exceptions. */
    if (sw && vector != 3 && vector != 4)
        return 0;
    /* The vectors that push an error code (SDM Vol. 3A Table 6-1): #DF #TS #NP
     * #SS #GP #PF #AC #CP; a software exception pushes none. */
    const int has_ec = !sw && ((1u << vector) & ((1u << 8) | (1u << 10) | (1u << 11) | (1u << 12) | (1u << 13)
                                                | (1u << 14) | (1u << 17) | (1u << 21))) != 0;
    int exits = (f->exc_bitmap >> vector) & 1;
    if (vector == 14) {
        const int match = (error_code & f->pf_mask) == f->pf_match;
        exits = match ? exits : !exits;
    }
    if (!exits)
        return 0;
    f->exit_reason = 0;   /* exception or NMI (SDM Vol. 3C Appendix C) */
    /* 28.2.2 VM-exit interruption information: bits 7:0 vector, 10:8 type (3
     * hardware exception, 6 software exception), bit 11 error code valid, bit
     * 31 valid; a software exception's instruction length is in the
     * VM-exit instruction-length field (28.2.5) and GUEST_RIP is the
     * instruction's (the caller rewinds RIP). */
    if (sw) {
        f->exit_intr_info = vector | (6u << 8) | (1u << 31);
        f->exit_len = 1;
    } else {
        f->exit_intr_info = vector | (3u << 8) | (has_ec ? 1u << 11 : 0) | (1u << 31);
        f->exit_len = 0;
    }
    f->exit_intr_error = has_ec ? error_code : 0;
    /* 28.2.1: the exit qualification of a #PF is its linear address (CR2) */
    f->exit_qual = vector == 14 ? cr2 : 0;
    f->hits++;
    return 1;
}

/* The exception a run stopped with (stop kind, uc_err), decided under f as
 * emu/cpu.py exit_of and _exception do: an exception or INT n Unicorn raised
 * (its vector, error code and the software flag in the CPU state), a #PF of an
 * instruction fetch from vmlab's TLB fill (CR2: the fetch's address on the
 * faulting page; a data access's CR2 needs the instruction decoded -- left to
 * Python), #UD (Unicorn's invalid-instruction error; INT1 / ICEBP, F1, ends a
 * run the same way and is left to Python). */
static int fast_decide_stop(vmlab_vcpu *v, const vmlab_regs *r, uint32_t kind, int err, vmlab_fastpath *f)
{
    if (!v->env)
        return 0;
    const uint64_t lin = (r->hflags & HF_CS64_MASK) ? r->rip : ((r->seg[1].base + r->rip) & 0xffffffffull);
    if (kind == VMLAB_STOP_EXCEPTION) {
        const uint32_t vec = v->intno, sw = r->exception_is_int != 0;
        if (sw && (vec == 3 || vec == 4)) {
            /* INT3 (CC) and INTO (CE) are software exceptions; INT 3 / INT 4
             * (CD ib) are software interrupts, which the bitmap does not
             * decide (emu/cpu.py _int_n): the byte before RIP says which. */
            vmlab_walk w;
            const uint32_t acc = VMLAB_ACC_FETCH | ((r->hflags & HF_CPL_MASK) == 3 ? VMLAB_ACC_USER : 0);
            if (vmlab_walk_do(v, lin - 1, acc, VMLAB_WALK_SET_AD, &w) != VMLAB_OK || w.paddr >= v->ram_size
                || v->ram[w.paddr] != (vec == 3 ? 0xcc : 0xce))
                return 0;
        }
        return vmlab_fast_decide_exc(f, vec, sw, (uint32_t)r->error_code, 0);
    }
    if (kind == VMLAB_STOP_PAGE_FAULT) {
        if (!(v->fault_access & VMLAB_ACC_FETCH))
            return 0;
        const uint64_t vpage = v->fault_vaddr;
        return vmlab_fast_decide_exc(f, 14, 0, v->fault_error_code, (lin & ~0xfffull) == vpage ? lin : vpage);
    }
    if (kind == VMLAB_STOP_NONE && err == UC_ERR_INSN_INVALID && ((f->exc_bitmap >> 6) & 1)) {
        /* The byte at RIP, fetched as the CPU does (A bits as the fetch set them). */
        vmlab_walk w;
        const uint32_t acc = VMLAB_ACC_FETCH | ((r->hflags & HF_CPL_MASK) == 3 ? VMLAB_ACC_USER : 0);
        if (vmlab_walk_do(v, lin, acc, VMLAB_WALK_SET_AD, &w) != VMLAB_OK || w.paddr >= v->ram_size
            || v->ram[w.paddr] == 0xf1)
            return 0;
        return vmlab_fast_decide_exc(f, 6, 0, 0, 0);
    }
    return 0;
}

/* One exit in one native call (the common path of Vcpu.run): run from r->rip
 * until something needs attention, read the register file, and at a trap site
 * let the fast path decide (f may be NULL).  Returns the stop kind
 * (VMLAB_STOP_*), VMLAB_STOP_FAST_EXIT for a fast-path VM exit (f->exit_*), or
 * -1 if the register read failed; *err gets emu_start's uc_err.  flags as for
 * vmlab_run; bit 1 (the block registry's logs are kept) also keeps the logs
 * that are otherwise dropped here. */
int vmlab_run_exit(vmlab_vcpu *v, void *uc, uint64_t deadline, uint32_t flags, vmlab_regs *r,
                   vmlab_fastpath *f, int *err)
{
    uint32_t kind;
    for (uint32_t round = 0;; round++) {
        v->stop_kind = 0;
        v->icount_deadline = deadline;
        *err = vmlab_run(v, uc, r->rip, flags);
        if (vmlab_regs_read(v, uc, r))
            return -1;
        kind = v->stop_kind;
        v->stop_kind = 0;
        if (!(flags & 2))
            v->ntb_new = v->ntb_inval = 0;
        if (kind == VMLAB_STOP_TRAP && !*err && f && vmlab_fast_decide(v, f)) {
            f->exit_rip = r->rip;
            return VMLAB_STOP_FAST_EXIT;
        }
        /* A MOV CR that does not VM-exit, or a served IN/OUT, completed in C: run on (bounded;
         * the deadline and the attention word end it as between runs). */
        if (kind == VMLAB_STOP_TRAP && !*err && f && !flags && round < 4096 && !v->attention
            && v->icount < deadline && (cr_emulate_site(v, uc, r, f) || pio_fast_site(v, uc, r, f)))
            continue;
        break;
    }
    if (f && f->exc_mode && kind <= VMLAB_STOP_PAGE_FAULT && fast_decide_stop(v, r, kind, *err, f)) {
        /* The exception VM-exits instead of being delivered: it is not in
         * flight (QEMU's old_exception, which Unicorn leaves set after
         * UC_HOOK_INTR, would make the next fault a #DF; as _exception). */
        const int32_t none = -1;
        memcpy(v->env - v->ctx_env + v->ctx_old_exception, &none, 4);
        f->exit_rip = r->rip;   /* as at the stop: for INT3/INTO after the instruction */
        return VMLAB_STOP_FAST_EXIT;
    }
    return (int)kind;
}

uint64_t vmlab_lean_deadline(uint32_t attention, uint64_t now, uint64_t slice, uint64_t timer, uint64_t limit)
{
    if (attention || timer <= now || limit <= now)
        return 0;
    uint64_t deadline = now + slice;
    if (deadline < now || timer < deadline)
        deadline = timer;
    if (limit < deadline)
        deadline = limit;
    return deadline;
}

/* The lean path's one call per exit (see vmlab.h; twin emu/lean.py lean_run). */
int64_t vmlab_lean_run(vmlab_lean *c)
{
    vmlab_vcpu *v = c->v;
    const uint64_t deadline = vmlab_lean_deadline(v->attention, v->icount, c->slice, c->timer, c->limit);
    if (!deadline)
        return VMLAB_LEAN_LOOK;
    c->runs++;
    int err = 0;
    const int kind = vmlab_run_exit(v, c->uc, deadline, 0, c->r, c->f, &err);
    c->err = err;
    if (kind == VMLAB_STOP_FAST_EXIT && c->f->exit_qual < (1ull << 32) && c->f->exit_len < 16) {
        if (c->f->vmcs)         /* the exit-information fields, written at the exit */
            vmlab_vmcs_store_exit(c->f, c->f->vmcs);
        return VMLAB_LEAN_EXIT | (int64_t)(c->f->exit_reason & 0xffff) | ((int64_t)c->f->exit_len << 17)
               | ((int64_t)c->f->exit_qual << 21);
    }
    return kind;
}

/* ---- paging registers of a VMX level switch (native/nested.c) -------------------
 * What vmm/vmx.py load_paging_state does through Vcpu.write_cr/write_efer, in one
 * call: paging off first when it is on, then EFER (LMA is the CPU's), CR4, CR3,
 * CR0; every cached translation dropped; the copies in v synced from Unicorn. */
int vmlab_paging_write(vmlab_vcpu *v, void *uc, uint64_t cr0, uint64_t cr3, uint64_t cr4, uint64_t efer)
{
    int ids[5];
    void *vals[5];
    int n = 0;
    uint64_t cur0 = 0, cr0_nopg;
    uc_x86_msr m = {0xC0000080u, efer & ~(1ull << 10)};
    uc_err err = api.reg_read(uc, UC_X86_REG_CR0, &cur0);
    if (err)
        return err;
    cr0_nopg = cur0 & ~(1ull << 31);
    if (cur0 & (1ull << 31)) { ids[n] = UC_X86_REG_CR0; vals[n++] = &cr0_nopg; }
    ids[n] = UC_X86_REG_MSR; vals[n++] = &m;
    ids[n] = UC_X86_REG_CR4; vals[n++] = &cr4;
    ids[n] = UC_X86_REG_CR3; vals[n++] = &cr3;
    ids[n] = UC_X86_REG_CR0; vals[n++] = &cr0;
    if ((err = api.reg_write_batch(uc, ids, vals, n)))
        return err;
    return paging_changed(v, uc);
}
