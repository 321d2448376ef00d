/* botwarden: records and events shared by the BPF programs and probes/records.py.
 *
 * Every struct here has a ctypes twin in probes/records.py; the loader passes
 * the twins' sizes in as BW_SIZEOF_* and the asserts below stop a load whose
 * layouts drifted apart. Addresses are always 16 bytes in network order, IPv4
 * stored IPv4-mapped (::ffff:a.b.c.d), so one key type serves both families.
 * Ports are host order.
 */
#ifndef BOTWARDEN_H
#define BOTWARDEN_H

#define BW_AF_UNIX 1
#define BW_AF_INET 2
#define BW_AF_INET6 10
#define BW_IPPROTO_TCP 6
#define BW_IPPROTO_UDP 17
#define BW_SOCK_STREAM 1
#define BW_SOCK_DGRAM 2

/* bw_target.flags */
#define BW_TARGET_REDIRECT 1    /* TCP connect is rewritten to the listener */
#define BW_TARGET_PASSTHROUGH 2 /* reached unmodified (e.g. a DNS resolver) */

/* bw_event.event */
#define BW_EV_DENIED 1
#define BW_EV_REDIRECTED 2
#define BW_EV_LEFT_CGROUP 3 /* a bot's process moved out of the bots' cgroups */

/* bw_event.reason */
#define BW_WHY_NONE 0
#define BW_WHY_NOT_REGISTERED 1  /* address/port is no registered target */
#define BW_WHY_NOT_TCP 2         /* a registered target, but not over TCP */
#define BW_WHY_LISTENER_FAMILY 3 /* AF_INET socket, IPv6-only listener */
#define BW_WHY_UDP_SEND 4        /* unconnected UDP sendmsg */
#define BW_WHY_SOCKET_TYPE 5     /* socket() of an inet type other than TCP or UDP */
#define BW_WHY_BIND_LISTENER 6   /* bind() to a port an inspector listener uses */
#define BW_WHY_UNIX_NOT_ALLOWED 7 /* connect/sendmsg to a Unix socket not in the allow-list */
#define BW_WHY_UNIX_USERNS 8     /* Unix socket from inside a user namespace (paths could lie) */
#define BW_WHY_CLONE_INTO 9      /* left_cgroup: forked straight into another cgroup */
#define BW_WHY_KILLED 10         /* left_cgroup: and killed (probes.kill_escaped) */

#define BW_UNIX_PATH_MAX 108     /* sizeof(sockaddr_un.sun_path) */

/* A Unix socket address in normal form: a pathname up to its first NUL (what
 * the kernel resolves), or an abstract name (path[0] == 0) of exactly len bytes. */
struct bw_unix_key {
    __u32 len;
    char path[BW_UNIX_PATH_MAX];
};

/* Where a Unix-socket target's connects go: the inspector's listening socket.
 * 128 bytes so that a length masked to 7 bits stays inside it for the verifier. */
struct bw_unix_dest {
    __u32 len;
    char path[128];
};

struct bw_addr_key {
    __u32 ip[4];
    __u16 port;
    __u16 pad;
};

struct bw_target {
    __u32 listener_ip[4];
    __u16 listener_port;
    __u16 flags;
    __u32 index; /* position in settings.targets, for the daemon */
};

/* Who called connect(): captured in the caller's syscall context only. */
struct bw_identity {
    __u64 cgroup_id;
    __u64 start_boottime_ns; /* thread-group leader's start, as /proc/<pid>/stat */
    __u64 exe_ino;
    __u64 ktime_ns;          /* CLOCK_MONOTONIC when recorded */
    __u32 pid;               /* thread id */
    __u32 tgid;              /* process id */
    __u32 uid;
    __u32 gid;
    __u32 exe_dev;           /* kernel dev_t encoding (major << 20 | minor) */
    __u32 pad;
    char comm[16];
};

struct bw_origin {
    struct bw_identity id;
    __u32 dst_ip[4];
    __u16 dst_port;
    __u16 family; /* of the bot's socket */
    __u32 target_index;
};

/* The connection as the inspector sees it after accept(). */
struct bw_tuple_key {
    __u32 local_ip[4]; /* getsockname() on the accepted socket: the listener */
    __u32 peer_ip[4];  /* getpeername(): the bot's source */
    __u16 local_port;
    __u16 peer_port;
};

struct bw_event {
    struct bw_identity id;
    __u32 dst_ip[4];
    __u16 dst_port;
    __u16 family;
    __u16 event;
    __u16 reason;
    __u32 protocol;
    __u32 pad;
    __u64 other_cgroup_id; /* left_cgroup: the bots' cgroup it was in */
    struct bw_unix_key path; /* AF_UNIX: the address; left_cgroup: where it went */
};

/* Written by the loader only: who owns the programs (status reads it). */
struct bw_meta {
    __u64 owner_start_ticks; /* /proc/<owner>/stat field 22 */
    __u64 attached_unix_ns;
    __u32 owner_tgid;
    __u32 layout;
    char cgroup_path[240];
};

#if defined(BW_SIZEOF_ORIGIN)
_Static_assert(sizeof(struct bw_addr_key) == BW_SIZEOF_ADDR_KEY, "bw_addr_key layout drifted");
_Static_assert(sizeof(struct bw_target) == BW_SIZEOF_TARGET, "bw_target layout drifted");
_Static_assert(sizeof(struct bw_origin) == BW_SIZEOF_ORIGIN, "bw_origin layout drifted");
_Static_assert(sizeof(struct bw_tuple_key) == BW_SIZEOF_TUPLE_KEY, "bw_tuple_key layout drifted");
_Static_assert(sizeof(struct bw_event) == BW_SIZEOF_EVENT, "bw_event layout drifted");
_Static_assert(sizeof(struct bw_meta) == BW_SIZEOF_META, "bw_meta layout drifted");
_Static_assert(sizeof(struct bw_unix_key) == BW_SIZEOF_UNIX_KEY, "bw_unix_key layout drifted");
_Static_assert(sizeof(struct bw_unix_dest) == BW_SIZEOF_UNIX_DEST, "bw_unix_dest layout drifted");
#endif

#endif /* BOTWARDEN_H */
