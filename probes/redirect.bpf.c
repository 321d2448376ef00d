// SPDX-License-Identifier: Apache-2.0
/* botwarden redirect: cgroup socket hooks for the bots' parent cgroup.
 *
 *   connect4/connect6   registered target -> rewrite to the inspector's
 *                       listener and remember who asked (by socket cookie);
 *                       anything else -> EPERM and a "denied" event.
 *   sendmsg4/sendmsg6   unconnected UDP: only passthrough entries.
 *   bind4/bind6         no binding the inspector's listener ports (a bot
 *                       must not receive other bots' redirected connections
 *                       while the daemon is down).
 *   sock_create         only TCP and UDP inet sockets (no raw, ICMP, SCTP,
 *                       MPTCP...: hooks above would not see their traffic).
 *   sockops             TCP_CONNECT_CB (source port known, SYN not sent yet):
 *                       copy the record to the key the inspector sees on
 *                       accept(); forget both when the socket closes.
 *   getpeername4/6      the bot sees the address it asked for.
 *   connect_unix        AF_UNIX (Linux 6.7+, BW_UNIX_HOOKS): only the
 *   sendmsg_unix        allow-listed socket paths, never from inside a user
 *                       namespace; anything else -> EPERM and an event.
 *   cgroup_attach,      (raw tracepoints, BW_WATCH_ESCAPES) follow the bots'
 *   task_fork,          processes and report each one that moves (or is
 *   task_exit           forked) out of the bots' cgroups: "left_cgroup".
 *
 * Options come in as -D defines from probes/loader.py (render_program shows
 * them): BW_PIN_DIR, BW_MAX_TARGETS, BW_MAX_CONNS, BW_RINGBUF_PAGES,
 * BW_EMIT_REDIRECTED, BW_UNIX_HOOKS, BW_WATCH_ESCAPES, BW_KILL_ESCAPED,
 * BW_BOTS_CGROUP_ID, BW_BOTS_LEVEL and the kernel struct offsets BW_OFF_*
 * read from BTF.
 */
#include <uapi/linux/bpf.h>
#include "botwarden.h"

/* bcc's helper header declares the cookie as 32-bit; it is 64. */
static __u64 (*bw_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

BPF_TABLE_PINNED("hash", struct bw_addr_key, struct bw_target, bw_targets, BW_MAX_TARGETS, BW_PIN_DIR "/targets");
BPF_TABLE_PINNED("lru_hash", __u64, struct bw_origin, bw_by_cookie, BW_MAX_CONNS, BW_PIN_DIR "/by_cookie");
BPF_TABLE_PINNED("lru_hash", struct bw_tuple_key, struct bw_origin, bw_by_tuple, BW_MAX_CONNS, BW_PIN_DIR "/by_tuple");
BPF_TABLE_PINNED("hash", __u32, __u32, bw_listeners, BW_MAX_TARGETS, BW_PIN_DIR "/listeners");
BPF_TABLE_PINNED("array", __u32, struct bw_meta, bw_meta, 1, BW_PIN_DIR "/meta");
/* BPF_RINGBUF_OUTPUT, pinned: the daemon drains it with libbpf, without bcc,
 * and a restarted daemon still finds what was reported while it was down. */
struct bw_events_table_t {
    int key;
    __u32 leaf;
    int (*ringbuf_output)(void *, __u64, __u64);
    void *(*ringbuf_reserve)(__u64);
    void (*ringbuf_discard)(void *, __u64);
    void (*ringbuf_submit)(void *, __u64);
    __u32 max_entries;
};
__attribute__((section("maps/ringbuf:" BW_PIN_DIR "/events")))
struct bw_events_table_t bw_events = {.max_entries = BW_RINGBUF_PAGES * 4096};

/* Stop clang from merging adjacent 4-byte ctx reads into 8-byte ones the verifier rejects. */
#define BW_BARRIER() asm volatile("" ::: "memory")

static __always_inline void bw_read_kernel_ptr(void **dst, void *base, long off)
{
    *dst = 0;
    if (base)
        bpf_probe_read_kernel(dst, sizeof(*dst), base + off);
}

static __always_inline void bw_fill_identity(struct bw_identity *id)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u64 uid_gid = bpf_get_current_uid_gid();
    void *task = (void *)bpf_get_current_task();
    void *leader, *mm, *exe, *inode, *sb;

    id->pid = (__u32)pid_tgid;
    id->tgid = pid_tgid >> 32;
    id->uid = (__u32)uid_gid;
    id->gid = uid_gid >> 32;
    id->cgroup_id = bpf_get_current_cgroup_id();
    id->ktime_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(id->comm, sizeof(id->comm));

    bw_read_kernel_ptr(&leader, task, BW_OFF_TASK_GROUP_LEADER);
    if (leader)
        bpf_probe_read_kernel(&id->start_boottime_ns, sizeof(id->start_boottime_ns),
                              leader + BW_OFF_TASK_START_BOOTTIME);
    bw_read_kernel_ptr(&mm, task, BW_OFF_TASK_MM);
    bw_read_kernel_ptr(&exe, mm, BW_OFF_MM_EXE_FILE);
    bw_read_kernel_ptr(&inode, exe, BW_OFF_FILE_INODE);
    if (inode) {
        bpf_probe_read_kernel(&id->exe_ino, sizeof(id->exe_ino), inode + BW_OFF_INODE_INO);
        bw_read_kernel_ptr(&sb, inode, BW_OFF_INODE_SB);
        if (sb)
            bpf_probe_read_kernel(&id->exe_dev, sizeof(id->exe_dev), sb + BW_OFF_SB_DEV);
    }
}

static __always_inline void bw_emit_path(const struct bw_addr_key *dst, __u16 family, __u32 protocol,
                                         __u16 event, __u16 reason, const struct bw_unix_key *path)
{
    struct bw_event *ev = bw_events.ringbuf_reserve(sizeof(struct bw_event));
    if (!ev)
        return; /* ring full: the verdict stands, only the report is lost */
    bw_fill_identity(&ev->id);
    ev->other_cgroup_id = 0;
    if (path)
        __builtin_memcpy(&ev->path, path, sizeof(ev->path));
    else
        __builtin_memset(&ev->path, 0, sizeof(ev->path));
    ev->dst_ip[0] = dst->ip[0];
    ev->dst_ip[1] = dst->ip[1];
    ev->dst_ip[2] = dst->ip[2];
    ev->dst_ip[3] = dst->ip[3];
    ev->dst_port = dst->port;
    ev->family = family;
    ev->event = event;
    ev->reason = reason;
    ev->protocol = protocol;
    ev->pad = 0;
    bw_events.ringbuf_submit(ev, 0);
}

static __always_inline void bw_emit(const struct bw_addr_key *dst, __u16 family, __u32 protocol,
                                    __u16 event, __u16 reason)
{
    bw_emit_path(dst, family, protocol, event, reason, 0);
}

static __always_inline int bw_deny(const struct bw_addr_key *dst, __u16 family, __u32 protocol, __u16 reason)
{
    bw_emit(dst, family, protocol, BW_EV_DENIED, reason);
    return 0; /* EPERM */
}

static __always_inline int bw_listener_is_v4(const struct bw_target *t)
{
    return t->listener_ip[0] == 0 && t->listener_ip[1] == 0 && t->listener_ip[2] == bpf_htonl(0xffff);
}

static __always_inline void bw_remember(struct bpf_sock_addr *ctx, const struct bw_addr_key *dst,
                                        __u16 family, const struct bw_target *t)
{
    struct bw_origin origin = {};
    __u64 cookie = bw_socket_cookie(ctx);

    bw_fill_identity(&origin.id);
    origin.dst_ip[0] = dst->ip[0];
    origin.dst_ip[1] = dst->ip[1];
    origin.dst_ip[2] = dst->ip[2];
    origin.dst_ip[3] = dst->ip[3];
    origin.dst_port = dst->port;
    origin.family = family;
    origin.target_index = t->index;
    bw_by_cookie.update(&cookie, &origin);
}

int bw_connect4(struct bpf_sock_addr *ctx)
{
    struct bw_addr_key key = {};
    __u32 protocol = ctx->protocol;
    struct bw_target *t;

    key.ip[2] = bpf_htonl(0xffff);
    key.ip[3] = ctx->user_ip4;
    key.port = bpf_ntohs((__u16)ctx->user_port);

    t = bw_targets.lookup(&key);
    if (t && (t->flags & BW_TARGET_PASSTHROUGH))
        return 1;
    if (!t || !(t->flags & BW_TARGET_REDIRECT))
        return bw_deny(&key, BW_AF_INET, protocol, BW_WHY_NOT_REGISTERED);
    if (protocol != BW_IPPROTO_TCP)
        return bw_deny(&key, BW_AF_INET, protocol, BW_WHY_NOT_TCP);
    if (!bw_listener_is_v4(t))
        return bw_deny(&key, BW_AF_INET, protocol, BW_WHY_LISTENER_FAMILY);

    bw_remember(ctx, &key, BW_AF_INET, t);
    ctx->user_ip4 = t->listener_ip[3];
    ctx->user_port = bpf_htons(t->listener_port);
#if BW_EMIT_REDIRECTED
    bw_emit(&key, BW_AF_INET, protocol, BW_EV_REDIRECTED, BW_WHY_NONE);
#endif
    return 1;
}

/* AF_INET6 sockets, including IPv4-mapped destinations (they never reach connect4). */
int bw_connect6(struct bpf_sock_addr *ctx)
{
    struct bw_addr_key key = {};
    __u32 protocol = ctx->protocol;
    struct bw_target *t;

    key.ip[0] = ctx->user_ip6[0];
    BW_BARRIER();
    key.ip[1] = ctx->user_ip6[1];
    BW_BARRIER();
    key.ip[2] = ctx->user_ip6[2];
    BW_BARRIER();
    key.ip[3] = ctx->user_ip6[3];
    BW_BARRIER();
    key.port = bpf_ntohs((__u16)ctx->user_port);

    t = bw_targets.lookup(&key);
    if (t && (t->flags & BW_TARGET_PASSTHROUGH))
        return 1;
    if (!t || !(t->flags & BW_TARGET_REDIRECT))
        return bw_deny(&key, BW_AF_INET6, protocol, BW_WHY_NOT_REGISTERED);
    if (protocol != BW_IPPROTO_TCP)
        return bw_deny(&key, BW_AF_INET6, protocol, BW_WHY_NOT_TCP);

    bw_remember(ctx, &key, BW_AF_INET6, t);
    /* An IPv4 listener is reached as ::ffff:a.b.c.d (fails for IPV6_V6ONLY sockets). */
    ctx->user_ip6[0] = t->listener_ip[0];
    ctx->user_ip6[1] = t->listener_ip[1];
    ctx->user_ip6[2] = t->listener_ip[2];
    ctx->user_ip6[3] = t->listener_ip[3];
    ctx->user_port = bpf_htons(t->listener_port);
#if BW_EMIT_REDIRECTED
    bw_emit(&key, BW_AF_INET6, protocol, BW_EV_REDIRECTED, BW_WHY_NONE);
#endif
    return 1;
}

int bw_sendmsg4(struct bpf_sock_addr *ctx)
{
    struct bw_addr_key key = {};
    struct bw_target *t;

    key.ip[2] = bpf_htonl(0xffff);
    key.ip[3] = ctx->user_ip4;
    key.port = bpf_ntohs((__u16)ctx->user_port);
    t = bw_targets.lookup(&key);
    if (t && (t->flags & BW_TARGET_PASSTHROUGH))
        return 1;
    return bw_deny(&key, BW_AF_INET, ctx->protocol, BW_WHY_UDP_SEND);
}

int bw_sendmsg6(struct bpf_sock_addr *ctx)
{
    struct bw_addr_key key = {};
    struct bw_target *t;

    key.ip[0] = ctx->user_ip6[0];
    BW_BARRIER();
    key.ip[1] = ctx->user_ip6[1];
    BW_BARRIER();
    key.ip[2] = ctx->user_ip6[2];
    BW_BARRIER();
    key.ip[3] = ctx->user_ip6[3];
    BW_BARRIER();
    key.port = bpf_ntohs((__u16)ctx->user_port);
    t = bw_targets.lookup(&key);
    if (t && (t->flags & BW_TARGET_PASSTHROUGH))
        return 1;
    return bw_deny(&key, BW_AF_INET6, ctx->protocol, BW_WHY_UDP_SEND);
}

static __always_inline int bw_bind(struct bpf_sock_addr *ctx, struct bw_addr_key *key, __u16 family)
{
    __u32 port = key->port;

    if (port && bw_listeners.lookup(&port))
        return bw_deny(key, family, ctx->protocol, BW_WHY_BIND_LISTENER);
    return 1;
}

int bw_bind4(struct bpf_sock_addr *ctx)
{
    struct bw_addr_key key = {};

    key.ip[2] = bpf_htonl(0xffff);
    key.ip[3] = ctx->user_ip4;
    key.port = bpf_ntohs((__u16)ctx->user_port);
    return bw_bind(ctx, &key, BW_AF_INET);
}

int bw_bind6(struct bpf_sock_addr *ctx)
{
    struct bw_addr_key key = {};

    key.ip[0] = ctx->user_ip6[0];
    BW_BARRIER();
    key.ip[1] = ctx->user_ip6[1];
    BW_BARRIER();
    key.ip[2] = ctx->user_ip6[2];
    BW_BARRIER();
    key.ip[3] = ctx->user_ip6[3];
    BW_BARRIER();
    key.port = bpf_ntohs((__u16)ctx->user_port);
    return bw_bind(ctx, &key, BW_AF_INET6);
}

int bw_sock_create(struct bpf_sock *sk)
{
    struct bw_addr_key none = {};
    __u32 type = sk->type;
    __u32 protocol = sk->protocol;

    if (type == BW_SOCK_STREAM && protocol == BW_IPPROTO_TCP)
        return 1;
    if (type == BW_SOCK_DGRAM && protocol == BW_IPPROTO_UDP)
        return 1;
    bw_emit(&none, sk->family, protocol, BW_EV_DENIED, BW_WHY_SOCKET_TYPE);
    return 0; /* socket() fails with EPERM */
}

/* The inspector's view: local = the listener (our remote), peer = our source. */
static __always_inline void bw_tuple_from_sockops(struct bpf_sock_ops *skops, struct bw_tuple_key *k)
{
    if (skops->family == BW_AF_INET) {
        k->local_ip[2] = bpf_htonl(0xffff);
        k->local_ip[3] = skops->remote_ip4;
        k->peer_ip[2] = bpf_htonl(0xffff);
        k->peer_ip[3] = skops->local_ip4;
    } else {
        k->local_ip[0] = skops->remote_ip6[0];
        BW_BARRIER();
        k->local_ip[1] = skops->remote_ip6[1];
        BW_BARRIER();
        k->local_ip[2] = skops->remote_ip6[2];
        BW_BARRIER();
        k->local_ip[3] = skops->remote_ip6[3];
        BW_BARRIER();
        k->peer_ip[0] = skops->local_ip6[0];
        BW_BARRIER();
        k->peer_ip[1] = skops->local_ip6[1];
        BW_BARRIER();
        k->peer_ip[2] = skops->local_ip6[2];
        BW_BARRIER();
        k->peer_ip[3] = skops->local_ip6[3];
        BW_BARRIER();
    }
    k->local_port = bpf_ntohl(skops->remote_port); /* network order in the upper 16 bits */
    k->peer_port = skops->local_port;             /* host order */
}

int bw_sockops(struct bpf_sock_ops *skops)
{
    struct bw_tuple_key key = {};
    struct bw_origin *origin;
    __u64 cookie;

    switch (skops->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
        cookie = bw_socket_cookie(skops);
        origin = bw_by_cookie.lookup(&cookie);
        if (!origin)
            return 1; /* not redirected by connect4/6 */
        bw_tuple_from_sockops(skops, &key);
        bw_by_tuple.update(&key, origin);
        /* Ask for state changes so both entries go when the socket closes. */
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        if (skops->args[1] != BPF_TCP_CLOSE)
            break;
        cookie = bw_socket_cookie(skops);
        if (!bw_by_cookie.lookup(&cookie))
            break;
        bw_tuple_from_sockops(skops, &key);
        bw_by_tuple.delete(&key);
        bw_by_cookie.delete(&cookie);
        break;
    }
    return 1;
}

int bw_getpeername4(struct bpf_sock_addr *ctx)
{
    __u64 cookie = bw_socket_cookie(ctx);
    struct bw_origin *origin = bw_by_cookie.lookup(&cookie);

    if (origin && origin->family == BW_AF_INET) {
        ctx->user_ip4 = origin->dst_ip[3];
        ctx->user_port = bpf_htons(origin->dst_port);
    }
    return 1;
}

int bw_getpeername6(struct bpf_sock_addr *ctx)
{
    __u64 cookie = bw_socket_cookie(ctx);
    struct bw_origin *origin = bw_by_cookie.lookup(&cookie);

    if (origin && origin->family == BW_AF_INET6) {
        ctx->user_ip6[0] = origin->dst_ip[0];
        ctx->user_ip6[1] = origin->dst_ip[1];
        ctx->user_ip6[2] = origin->dst_ip[2];
        ctx->user_ip6[3] = origin->dst_ip[3];
        ctx->user_port = bpf_htons(origin->dst_port);
    }
    return 1;
}

#if BW_UNIX_HOOKS
BPF_TABLE_PINNED("hash", struct bw_unix_key, __u32, bw_unix_allow, BW_MAX_UNIX_ALLOW, BW_PIN_DIR "/unix_allow");

/* The address the caller passed, in normal form. The UAPI bpf_sock_addr has no
 * field for a Unix path (6.7+ reads it through a kfunc bcc cannot call), but at
 * run time ctx is the kernel's struct bpf_sock_addr_kern: read its uaddr and
 * uaddrlen at BTF offsets. uaddr is the kernel's own copy (a sockaddr_storage),
 * not user memory, so another thread cannot change it after this check. */
static __always_inline int bw_unix_address(struct bpf_sock_addr *ctx, struct bw_unix_key *key)
{
    void *uaddr = 0;
    __u32 n = 0;
    int end = 0;

    bpf_probe_read_kernel(&uaddr, sizeof(uaddr), (char *)ctx + BW_OFF_SA_KERN_UADDR);
    bpf_probe_read_kernel(&n, sizeof(n), (char *)ctx + BW_OFF_SA_KERN_UADDRLEN);
    if (!uaddr || n <= 2)
        return -1;
    n -= 2; /* sun_family */
    if (bpf_probe_read_kernel(key->path, sizeof(key->path), (char *)uaddr + 2))
        return -1;
    if (key->path[0]) { /* a pathname ends at its first NUL, as the kernel reads it */
#pragma unroll
        for (int i = 0; i < BW_UNIX_PATH_MAX; i++) {
            if (i >= n || key->path[i] == 0)
                end = 1;
            if (end)
                key->path[i] = 0;
            else
                key->len = i + 1;
        }
    } else { /* abstract: every one of the n bytes counts */
#pragma unroll
        for (int i = 0; i < BW_UNIX_PATH_MAX; i++) {
            if (i >= n)
                key->path[i] = 0;
        }
        key->len = n > BW_UNIX_PATH_MAX ? BW_UNIX_PATH_MAX : n;
    }
    return 0;
}

/* In a user namespace a non-root bot can chroot or bind-mount another socket
 * over an allowed path: the path string no longer names the allowed socket. */
static __always_inline int bw_in_user_namespace(void)
{
    void *task = (void *)bpf_get_current_task();
    void *cred, *ns;
    int level = 1;

    bw_read_kernel_ptr(&cred, task, BW_OFF_TASK_CRED);
    bw_read_kernel_ptr(&ns, cred, BW_OFF_CRED_USER_NS);
    if (ns)
        bpf_probe_read_kernel(&level, sizeof(level), ns + BW_OFF_USER_NS_LEVEL);
    return level != 0;
}

static __always_inline int bw_unix(struct bpf_sock_addr *ctx)
{
    struct bw_addr_key none = {};
    struct bw_unix_key key = {};
    __u32 protocol = ctx->protocol;

    if (bw_unix_address(ctx, &key) < 0) {
        bw_emit_path(&none, BW_AF_UNIX, protocol, BW_EV_DENIED, BW_WHY_UNIX_NOT_ALLOWED, &key);
        return 0;
    }
    if (bw_in_user_namespace()) {
        bw_emit_path(&none, BW_AF_UNIX, protocol, BW_EV_DENIED, BW_WHY_UNIX_USERNS, &key);
        return 0;
    }
    if (bw_unix_allow.lookup(&key))
        return 1;
    bw_emit_path(&none, BW_AF_UNIX, protocol, BW_EV_DENIED, BW_WHY_UNIX_NOT_ALLOWED, &key);
    return 0; /* EPERM */
}

#if BW_UNIX_REDIRECT
/* Unix-socket targets: the target's path -> the inspector's socket. The kernel (6.7+) rewrites
 * the address with the kfunc bpf_sock_addr_set_sun_path on the kernel context. bcc cannot emit
 * kfunc calls: these two are placeholder helper ids that the loader rewrites into
 * BPF_PSEUDO_KFUNC_CALLs with the functions' ids from the vmlinux BTF (probes/loader.py). */
BPF_TABLE_PINNED("hash", struct bw_unix_key, struct bw_unix_dest, bw_unix_targets, BW_MAX_UNIX_TARGETS,
                 BW_PIN_DIR "/unix_targets");
static void *(*bw_kfunc_cast_to_kern_ctx)(void *ctx) = (void *)BW_KFUNC_CAST_TO_KERN_CTX;
static int (*bw_kfunc_set_sun_path)(void *sa_kern, const unsigned char *path, __u32 len) =
    (void *)BW_KFUNC_SET_SUN_PATH;
#endif

int bw_connect_unix(struct bpf_sock_addr *ctx)
{
#if BW_UNIX_REDIRECT
    struct bw_unix_key key = {};
    struct bw_addr_key none = {};
    if (bw_unix_address(ctx, &key) == 0 && !bw_in_user_namespace()) {
        struct bw_unix_dest *dest = bw_unix_targets.lookup(&key);
        if (dest) {
            __u32 len = dest->len & 0x7f; /* bounded for the verifier; the kfunc refuses > 108 */
            if (len == 0 || bw_kfunc_set_sun_path(bw_kfunc_cast_to_kern_ctx(ctx), (const unsigned char *)dest->path, len))
                return 0; /* fail closed: never the target's own socket */
#if BW_EMIT_REDIRECTED
            bw_emit_path(&none, BW_AF_UNIX, ctx->protocol, BW_EV_REDIRECTED, BW_WHY_NONE, &key);
#endif
            return 1;
        }
    }
#endif
    return bw_unix(ctx);
}

int bw_sendmsg_unix(struct bpf_sock_addr *ctx)
{
    return bw_unix(ctx);
}
#endif /* BW_UNIX_HOOKS */

#if BW_WATCH_ESCAPES
/* Processes of the bots (tgid -> the bots' cgroup id they were last seen in):
 * added when they join a cgroup under the bots' parent (bot run) or are forked
 * by one, dropped when they exit or leave. The loader adds those already there. */
BPF_TABLE_PINNED("lru_hash", __u32, __u64, bw_bot_tasks, BW_MAX_CONNS, BW_PIN_DIR "/bot_tasks");

static __always_inline __u64 bw_cgroup_id(void *cgrp)
{
    void *kn;
    __u64 id = 0;

    bw_read_kernel_ptr(&kn, cgrp, BW_OFF_CGROUP_KN);
    if (kn)
        bpf_probe_read_kernel(&id, sizeof(id), kn + BW_OFF_KERNFS_NODE_ID);
    return id;
}

/* The unified (v2) hierarchy is hierarchy 0; v1 hierarchies of a hybrid host are not ours. */
static __always_inline int bw_cgroup_is_v2(void *cgrp)
{
    void *root;
    int hierarchy = -1;

    bw_read_kernel_ptr(&root, cgrp, BW_OFF_CGROUP_ROOT);
    if (root)
        bpf_probe_read_kernel(&hierarchy, sizeof(hierarchy), root + BW_OFF_CGROUP_ROOT_HIERARCHY_ID);
    return hierarchy == 0;
}

static __always_inline int bw_under_bots(void *cgrp)
{
    void *ancestor;
    int level = -1;

    bpf_probe_read_kernel(&level, sizeof(level), cgrp + BW_OFF_CGROUP_LEVEL);
    if (level < BW_BOTS_LEVEL)
        return 0;
    bw_read_kernel_ptr(&ancestor, cgrp, BW_OFF_CGROUP_ANCESTORS + BW_BOTS_LEVEL * sizeof(void *));
    return ancestor && bw_cgroup_id(ancestor) == BW_BOTS_CGROUP_ID;
}

static __always_inline __u32 bw_task_u32(void *task, long off)
{
    __u32 v = 0;

    bpf_probe_read_kernel(&v, sizeof(v), task + off);
    return v;
}

/* Report (and with BW_KILL_ESCAPED stop) a bot process found outside the bots' cgroups. */
static __always_inline void bw_left(void *task, __u64 from, void *dst, const char *dst_path, __u16 reason)
{
    struct bw_event *ev;
    void *cred, *leader, *mm, *exe, *inode, *sb;
    __u32 tgid = bw_task_u32(task, BW_OFF_TASK_TGID);
    int killed = 0;

#if BW_KILL_ESCAPED
    /* Only the current task can be signalled from here: the usual case, a bot
     * writing its own pid. The daemon kills the others by pid. */
    if ((bpf_get_current_pid_tgid() >> 32) == tgid && bpf_send_signal(9) == 0)
        killed = 1;
#endif
    ev = bw_events.ringbuf_reserve(sizeof(struct bw_event));
    if (!ev)
        return;
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->id.pid = bw_task_u32(task, BW_OFF_TASK_PID);
    ev->id.tgid = tgid;
    bw_read_kernel_ptr(&cred, task, BW_OFF_TASK_REAL_CRED);
    if (cred) {
        ev->id.uid = bw_task_u32(cred, BW_OFF_CRED_UID);
        ev->id.gid = bw_task_u32(cred, BW_OFF_CRED_GID);
    }
    ev->id.cgroup_id = bw_cgroup_id(dst);
    ev->id.ktime_ns = bpf_ktime_get_ns();
    bpf_probe_read_kernel(ev->id.comm, sizeof(ev->id.comm), task + BW_OFF_TASK_COMM);
    bw_read_kernel_ptr(&leader, task, BW_OFF_TASK_GROUP_LEADER);
    if (leader)
        bpf_probe_read_kernel(&ev->id.start_boottime_ns, sizeof(ev->id.start_boottime_ns),
                              leader + BW_OFF_TASK_START_BOOTTIME);
    bw_read_kernel_ptr(&mm, task, BW_OFF_TASK_MM);
    bw_read_kernel_ptr(&exe, mm, BW_OFF_MM_EXE_FILE);
    bw_read_kernel_ptr(&inode, exe, BW_OFF_FILE_INODE);
    if (inode) {
        bpf_probe_read_kernel(&ev->id.exe_ino, sizeof(ev->id.exe_ino), inode + BW_OFF_INODE_INO);
        bw_read_kernel_ptr(&sb, inode, BW_OFF_INODE_SB);
        if (sb)
            bpf_probe_read_kernel(&ev->id.exe_dev, sizeof(ev->id.exe_dev), sb + BW_OFF_SB_DEV);
    }
    ev->event = BW_EV_LEFT_CGROUP;
    ev->reason = killed ? BW_WHY_KILLED : reason;
    ev->other_cgroup_id = from;
    if (dst_path) {
        long n = bpf_probe_read_kernel_str(ev->path.path, sizeof(ev->path.path), dst_path);
        ev->path.len = n > 0 ? n - 1 : 0;
    }
    bw_events.ringbuf_submit(ev, 0);
}

/* cgroup_attach_task(struct cgroup *dst, const char *path, struct task_struct *task, bool threadgroup):
 * runs after the move, so where the task came from is what bw_bot_tasks remembers. */
int bw_cgroup_attach(struct bpf_raw_tracepoint_args *ctx)
{
    void *dst = (void *)ctx->args[0];
    void *task = (void *)ctx->args[2];
    __u32 tgid;
    __u64 id, *from;

    if (!dst || !task || !bw_cgroup_is_v2(dst))
        return 0;
    tgid = bw_task_u32(task, BW_OFF_TASK_TGID);
    if (bw_under_bots(dst)) {
        id = bw_cgroup_id(dst);
        bw_bot_tasks.update(&tgid, &id);
        return 0;
    }
    from = bw_bot_tasks.lookup(&tgid);
    if (!from)
        return 0;
    id = *from;
    bw_bot_tasks.delete(&tgid);
    bw_left(task, id, dst, (const char *)ctx->args[1], BW_WHY_NONE);
    return 0;
}

/* sched_process_fork(struct task_struct *parent, struct task_struct *child): a bot's
 * child is a bot, unless clone3(CLONE_INTO_CGROUP) put it somewhere else. */
int bw_task_fork(struct bpf_raw_tracepoint_args *ctx)
{
    void *parent = (void *)ctx->args[0];
    void *child = (void *)ctx->args[1];
    void *css_set, *cgrp;
    __u32 ptgid, ctgid;
    __u64 id, *from;

    if (!parent || !child)
        return 0;
    ptgid = bw_task_u32(parent, BW_OFF_TASK_TGID);
    ctgid = bw_task_u32(child, BW_OFF_TASK_TGID);
    if (ptgid == ctgid)
        return 0; /* a new thread */
    from = bw_bot_tasks.lookup(&ptgid);
    if (!from)
        return 0;
    id = *from;
    bw_read_kernel_ptr(&css_set, child, BW_OFF_TASK_CGROUPS);
    bw_read_kernel_ptr(&cgrp, css_set, BW_OFF_CSS_SET_DFL_CGRP);
    if (!cgrp || bw_under_bots(cgrp)) {
        if (cgrp)
            id = bw_cgroup_id(cgrp);
        bw_bot_tasks.update(&ctgid, &id);
        return 0;
    }
    bw_left(child, id, cgrp, 0, BW_WHY_CLONE_INTO);
    return 0;
}

/* sched_process_exit(struct task_struct *p, ...): forget a process when its leader exits. */
int bw_task_exit(struct bpf_raw_tracepoint_args *ctx)
{
    void *task = (void *)ctx->args[0];
    __u32 pid, tgid;

    if (!task)
        return 0;
    pid = bw_task_u32(task, BW_OFF_TASK_PID);
    tgid = bw_task_u32(task, BW_OFF_TASK_TGID);
    if (pid == tgid)
        bw_bot_tasks.delete(&tgid);
    return 0;
}
#endif /* BW_WATCH_ESCAPES */
