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
 *
 * Options come in as -D defines from probes/loader.py (render_program shows
 * them): BW_PIN_DIR, BW_MAX_TARGETS, BW_MAX_CONNS, BW_RINGBUF_PAGES,
 * BW_EMIT_REDIRECTED and the kernel struct offsets BW_OFF_* read from BTF.
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

static __always_inline void bw_emit(const struct bw_addr_key *dst, __u16 family, __u32 protocol,
                                    __u16 event, __u16 reason)
{
    struct bw_event *ev = bw_events.ringbuf_reserve(sizeof(struct bw_event));
    if (!ev)
        return; /* ring full: the verdict stands, only the report is lost */
    bw_fill_identity(&ev->id);
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
