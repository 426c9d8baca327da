/* vmlab debugger support: breakpoints, watchpoints, mode-change and
 * asynchronous stops, all without a per-instruction hook.
 *
 * - A breakpoint is a one-address UC_HOOK_CODE hook (the mechanism of trap
 *   sites, native/hooks.c exit_add): Unicorn compiles the callback into the one
 *   instruction it covers, so guest memory is never written and code that does
 *   not run costs nothing.  A physical breakpoint gets such a hook at every
 *   linear address that the TLB fill maps onto its page for a fetch.
 * - A watchpoint is checked by the TLB fill (vmlab_dbg_fill): a page that holds
 *   a watched range is handed out without the watched right (W for a write
 *   watch, R for a read watch), so every such access to the page comes back
 *   through the fill, which stops before the access (VMLAB_STOP_WATCH).  Python
 *   decides whether the instruction's exact operand touches the range.
 * - Mode-change breaks and asynchronous stops (Ctrl-C from another thread) are
 *   checked at block boundaries by the block hook's slow path; the stop happens
 *   before the block runs.  Stopping a running engine with uc_emu_stop from
 *   another thread is not safe with Unicorn 2.1.4 (it can repeat a store), so
 *   another thread only sets flags (vmlab_request_slow_path).
 *
 * The Python side is emu/debugpoints.py.
 */
#include <string.h>
#include <stdbool.h>
#include <unicorn/unicorn.h>
#include "vmlab.h"

typedef uc_err (*fn_hook_add)(uc_engine *, uc_hook *, int, void *, void *, uint64_t, uint64_t, ...);
typedef uc_err (*fn_hook_del)(uc_engine *, uc_hook);
typedef uc_err (*fn_emu_stop)(uc_engine *);
typedef uc_err (*fn_ctl)(uc_engine *, uc_control_type, ...);

static struct {
    fn_hook_add hook_add;
    fn_hook_del hook_del;
    fn_emu_stop emu_stop;
    fn_ctl ctl;
} dapi;

void vmlab_debug_set_api(void *hook_add, void *hook_del, void *emu_stop, void *ctl)
{
    dapi.hook_add = (fn_hook_add)hook_add;
    dapi.hook_del = (fn_hook_del)hook_del;
    dapi.emu_stop = (fn_emu_stop)emu_stop;
    dapi.ctl = (fn_ctl)ctl;
}

#define HF_PE (1u << 7)
#define HF_CS32 (1u << 4)
#define HF_LMA (1u << 14)
#define HF_CS64 (1u << 15)
#define HF_VM (1u << 17)

/* The CPU mode as one number: QEMU hflags PE, CS32, LMA, CS64, VM (real,
 * protected 16/32, virtual-8086, compatibility, 64-bit) plus CR0.PG (bit 31). */
uint32_t vmlab_dbg_mode(vmlab_vcpu *v)
{
    uint32_t hf = v->env ? *(volatile uint32_t *)(v->env + v->env_hflags) : 0;
    return (hf & (HF_PE | HF_CS32 | HF_LMA | HF_CS64 | HF_VM)) | (uint32_t)(v->cr0 & (1ull << 31));
}

static int find(const uint64_t *arr, uint32_t n, uint64_t a)
{
    for (uint32_t k = 0; k < n; k++)
        if (arr[k] == a)
            return (int)k;
    return -1;
}

static void hook_break(uc_engine *uc, uint64_t addr, uint32_t size, void *ud)
{
    (void)size;
    vmlab_dbg_break_hit(ud, uc, addr);
}

/* Put a code hook on linear address a (once).  Translated blocks holding it
 * are dropped so the hook is compiled in (hooks apply at translation). */
static int hook_at(vmlab_vcpu *v, uc_engine *uc, uint64_t a, int drop_tb)
{
    vmlab_debug *d = v->dbg;
    if (find(d->hooked, d->nhooked, a) >= 0)
        return 0;
    if (d->nhooked >= VMLAB_MAX_HOOKED)
        return -1;
    uc_hook h = 0;
    if (dapi.hook_add(uc, &h, UC_HOOK_CODE, (void *)hook_break, v, a, a) != UC_ERR_OK)
        return -1;
    d->hooked[d->nhooked] = a;
    d->hooks[d->nhooked++] = (uint64_t)h;
    if (drop_tb)
        dapi.ctl(uc, UC_CTL_WRITE(UC_CTL_TB_REMOVE_CACHE, 2), a, a + 1);
    return 0;
}

static void unhook_at(vmlab_vcpu *v, uc_engine *uc, uint64_t a)
{
    vmlab_debug *d = v->dbg;
    const int k = find(d->hooked, d->nhooked, a);
    if (k < 0)
        return;
    dapi.hook_del(uc, (uc_hook)d->hooks[k]);
    d->nhooked--;
    d->hooked[k] = d->hooked[d->nhooked];
    d->hooks[k] = d->hooks[d->nhooked];
    dapi.ctl(uc, UC_CTL_WRITE(UC_CTL_TB_REMOVE_CACHE, 2), a, a + 1);
}

/* Add a breakpoint (physical: addr is guest-physical).  Returns 0, 1 if it
 * was already set, -1 if the table is full. */
int vmlab_dbg_add_break(vmlab_vcpu *v, void *uc, uint64_t addr, int physical)
{
    vmlab_debug *d = v->dbg;
    if (physical) {
        if (find(d->phys_breaks, d->nphys_breaks, addr) >= 0)
            return 1;
        if (d->nphys_breaks >= VMLAB_MAX_BREAKS)
            return -1;
        d->phys_breaks[d->nphys_breaks++] = addr;
        /* Linear aliases are hooked as fetch fills map the page: refill and
         * retranslate everything once. */
        dapi.ctl(uc, UC_CTL_WRITE(UC_CTL_TB_FLUSH, 0));
        dapi.ctl(uc, UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0));
        return 0;
    }
    if (find(d->breaks, d->nbreaks, addr) >= 0)
        return 1;
    if (d->nbreaks >= VMLAB_MAX_BREAKS)
        return -1;
    if (hook_at(v, uc, addr, 1))
        return -1;
    d->breaks[d->nbreaks++] = addr;
    return 0;
}

/* Remove a breakpoint; returns 0, or -1 if there was none.  Hooks put for
 * physical breakpoints stay until every physical breakpoint is gone (a stale
 * one only costs a check when its instruction runs). */
int vmlab_dbg_remove_break(vmlab_vcpu *v, void *uc, uint64_t addr, int physical)
{
    vmlab_debug *d = v->dbg;
    if (physical) {
        const int k = find(d->phys_breaks, d->nphys_breaks, addr);
        if (k < 0)
            return -1;
        d->phys_breaks[k] = d->phys_breaks[--d->nphys_breaks];
        if (!d->nphys_breaks)
            for (uint32_t i = d->nhooked; i-- > 0;)
                if (find(d->breaks, d->nbreaks, d->hooked[i]) < 0)
                    unhook_at(v, uc, d->hooked[i]);
        return 0;
    }
    const int k = find(d->breaks, d->nbreaks, addr);
    if (k < 0)
        return -1;
    d->breaks[k] = d->breaks[--d->nbreaks];
    if (!d->nphys_breaks)
        unhook_at(v, uc, addr);
    return 0;
}

/* Called by the breakpoint hooks and by a trap site's hook (a breakpoint on
 * an instruction that is also a trap site stops as a breakpoint first):
 * stops before the instruction at addr if a breakpoint applies.  Returns 1 if
 * it stopped. */
int vmlab_dbg_break_hit(vmlab_vcpu *v, void *uc, uint64_t addr)
{
    vmlab_debug *d = v->dbg;
    if (!d || d->suspend_breaks || !(d->nbreaks | d->nphys_breaks))
        return 0;
    int hit = find(d->breaks, d->nbreaks, addr) >= 0;
    if (!hit && d->nphys_breaks) {
        vmlab_walk w;
        if (vmlab_walk_do(v, addr, 0, VMLAB_WALK_IMPLICIT_SUP, &w) == VMLAB_OK)
            hit = find(d->phys_breaks, d->nphys_breaks, w.paddr) >= 0;
    }
    if (!hit)
        return 0;
    v->stop_kind = VMLAB_STOP_BREAK;
    d->hit_addr = addr;
    dapi.emu_stop(uc);
    return 1;
}

/* The TLB fill's debugger step, after a successful translation of vaddr's page
 * to ppage with *perms: hooks the linear aliases of physical breakpoints on a
 * fetch, and applies watchpoints.  Returns 1 to fail the fill (a watched
 * access: v->stop_kind = VMLAB_STOP_WATCH), else 0 with *perms reduced so
 * that watched accesses to the page come back here. */
int vmlab_dbg_fill(vmlab_vcpu *v, void *uc, uint64_t vaddr, uint64_t ppage, uint32_t access, uint32_t *perms)
{
    vmlab_debug *d = v->dbg;
    const uint64_t vpage = vaddr & ~0xfffull;
    if ((access & VMLAB_ACC_FETCH) && d->nphys_breaks)
        for (uint32_t k = 0; k < d->nphys_breaks; k++)
            if ((d->phys_breaks[k] & ~0xfffull) == ppage)
                hook_at(v, uc, vpage | (d->phys_breaks[k] & 0xfff), 0);
    if (!d->nwatch || d->suspend_watch)
        return 0;
    uint32_t kinds = 0;
    for (uint32_t k = 0; k < d->nwatch; k++) {
        const vmlab_watch *w = &d->watch[k];
        const uint64_t page = w->physical ? ppage : vpage;
        if (w->addr < page + 4096 && w->addr + w->len > page)
            kinds |= w->kinds;
    }
    if (!kinds)
        return 0;
    const int is_write = (access & VMLAB_ACC_WRITE) != 0, is_fetch = (access & VMLAB_ACC_FETCH) != 0;
    if ((is_write && (kinds & VMLAB_WATCH_WRITE)) || (!is_write && !is_fetch && (kinds & VMLAB_WATCH_READ))) {
        v->stop_kind = VMLAB_STOP_WATCH;
        d->hit_addr = vpage;
        d->hit_paddr = ppage;
        d->hit_access = access;
        return 1;
    }
    if (kinds & VMLAB_WATCH_WRITE)
        *perms &= ~(uint32_t)VMLAB_PROT_W;
    if (kinds & VMLAB_WATCH_READ)
        *perms &= ~(uint32_t)VMLAB_PROT_R;
    return 0;
}

/* The block hook's slow path asks here first (the block has not run): an
 * asynchronous stop request, or a mode change under break_mode.  Returns 1 if
 * it stopped the engine. */
int vmlab_dbg_block(vmlab_vcpu *v, void *uc)
{
    vmlab_debug *d = v->dbg;
    if (__atomic_load_n(&d->async_stop, __ATOMIC_ACQUIRE)) {
        v->stop_kind = VMLAB_STOP_DEBUG;
        d->hit_reason = VMLAB_DBG_ASYNC;
        dapi.emu_stop(uc);
        return 1;
    }
    if (d->break_mode) {
        const uint32_t m = vmlab_dbg_mode(v);
        if (m != d->mode_state) {
            d->mode_state = m;
            v->stop_kind = VMLAB_STOP_DEBUG;
            d->hit_reason = VMLAB_DBG_MODE;
            dapi.emu_stop(uc);
            return 1;
        }
    }
    return 0;
}
