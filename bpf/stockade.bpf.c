// SPDX-License-Identifier: GPL-2.0
/*
 * stockade's eBPF datapath: one tc program on the host side of every endpoint veth
 * (tcx ingress = packets leaving the pod, tcx egress = packets entering it).
 *
 * A packet leaving a pod whose port has a guard (stockade_from_pod only) is first held
 * to what its pod owns, before conntrack (a forged SYN must not leave an entry whose
 * reversed tuple then lets "replies" through): the Ethernet source is the pod's MAC
 * (when known; when not, no MAC another guarded port is bound to); no VLAN tag; IPv4 only from the pod's IPv4 address; IPv6 from its
 * IPv6 address, and from a link-local one or :: only neighbour discovery and MLD; a
 * neighbour advertisement's or duplicate address probe's target its own address or
 * link-local (with the MAC known, the link-local address is the MAC's own, EUI-64:
 * the only one it sends from or claims); no router
 * advertisement or redirect; ARP claiming only its IPv4 address (or 0.0.0.0, a
 * probe) at its MAC; no other ethertype; no IP broadcast or multicast but neighbour
 * discovery and MLD. A packet entering a guarded pod (stockade_to_pod) to one host is
 * for the pod's own address, or is neighbour discovery or MLD: a pod takes one to a
 * broadcast or multicast address, or to its link-local one, as its own, and no policy
 * names those. A port without an entry is unguarded, as before guards existed, but for
 * one thing: it sends from no guarded pod's MAC (the bridge would learn that pod at
 * the port, and forward the pod's frames there).
 *
 * Then per packet, as the nftables forward chain does:
 *   1. conntrack first: a packet of a tracked connection (either direction), or an
 *      ICMP error about one, passes. A connection is keyed by its tuple in normal form
 *      (the side with the lower address and port first; CT_ORIG_B in the entry says
 *      the other side opened it), so both directions find it in one lookup per map:
 *      a reply's lookups under its own tuple first, which missed in a cold bucket on
 *      every new connection, were about a third of the programs' time. A new
 *      connection's entry goes in `ct`, an LRU hash; once answered and used again
 *      by its originator (a TCP handshake's last ACK, a UDP exchange going on) it
 *      moves to `ct_live`, a hash nothing
 *      evicts, while its port holds fewer than CT_LIVE_PER_PORT there: a pod that
 *      opens connections faster than `ct` can hold (one flood of SYNs) would
 *      otherwise push every established connection of the node out of the LRU, and
 *      the next packet of each (never a SYN) would be dropped. A connection that
 *      closes (FIN, RST) goes back to `ct`, which ages it out; one abandoned in
 *      `ct_live` is swept by the loader; an entry validated under an older policy
 *      generation is judged again (a revoked connection is cut, unless every
 *      denying side keeps existing connections: a tier's Deny of a policy annotated
 *      keep, or a NetworkPolicy policy that keeps);
 *   2. ICMPv6 neighbour solicitation/advertisement passes;
 *   3. a TCP packet that would open a connection without SYN is dropped;
 *   4. the source's egress side and the destination's ingress side must both pass
 *      the packet; if they do, a conntrack entry is created. A side is judged by up
 *      to MAX_STAGES policies in turn (a ClusterNetworkPolicy Admin tier, then
 *      NetworkPolicy or the Baseline tier): one policy-map lookup with the peer's
 *      identity, and one with ANY only when that misses and the policy has ANY
 *      entries (a rule without a peer condition); the entry's action ends
 *      the side (allow: it passes, deny: the packet is dropped) or goes on to the
 *      next stage (pass; none left: the side passes). The loader resolved each
 *      tier's first-matching rule into the entries (src/stockade/compile/bpf.py), so
 *      no rule is scanned here. A NetworkPolicy policy's entries all allow and a
 *      miss denies; a tier's miss passes on (no rule matched).
 * Both hooks judge both sides, so a packet between two local endpoints is judged
 * at the first hook it meets and passes the second one through conntrack.
 *
 * IP fragments (fail closed, as Cilium does): a first fragment (offset 0, more to
 * come) carries the transport header and is judged like any packet; when it
 * passes, its ports are recorded under (family, src, dst, protocol, IP id). A
 * later fragment takes the ports recorded for its datagram and is judged with
 * them (through conntrack, as its first fragment was); one whose first fragment
 * was not seen passing (denied, or arriving out of order) is dropped.
 *
 * Maps (all pinned by the loader, see src/stockade/datapath/ebpf.py):
 *   ipcache4/6  LPM trie: (slot, prefix) -> identity, the policies of the endpoint's
 *               entries (the loader's) and of its stages per direction
 *   policy      LPM trie: (slot|policy, identity, protocol, port prefix) -> action
 *   config      the active slot and the policy generation (the atomic switch)
 *   inflight    per-CPU: judgements started and ended (when the old slot is read no
 *               more)
 *   ct          LRU hash: the program's own connection tracking, new connections
 *   ct_live     hash: established connections (see 1. above)
 *   ct_owners   hash: a port's ifindex -> how many of ct_live's entries it holds
 *   frag        LRU hash: (family, src, dst, protocol, IP id) of an allowed first
 *               fragment -> its ports, so the later fragments are judged as it was
 *   guard       hash: a pod's bridge port (host-side ifindex) -> its MAC and addresses
 *               (not slotted: each port's entry is replaced in one update)
 *   mac_port    hash: a guarded pod's MAC -> its port and bridge (see deliver)
 *   events      ring buffer: denied new connections, rate-limited
 *   meta        definitions the loader reads back (never read here)
 *   stats       per-CPU counters
 * Every map keyed by slot holds two copies of the policy: the loader writes the
 * inactive one, flips `config.slot` (one 4-byte write) and then catches the other
 * copy up, so a packet sees the old policy or the new one, never a mix.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ANY4 3
#define ANY6 4
#define KEEP_MARK 0 /* policy (policy, KEEP_MARK, 0, 0)/64: the policy keeps connections */
#define WORLD4 1
#define WORLD6 2
#define SLOT_BIT 0x80000000u
#define MAX_STAGES 2 /* policies judging one side in turn: Admin, then NetworkPolicy/Baseline */
/* a stage in the ipcache: its policy, and what a miss means */
#define STAGE_TIER 0x40000000u   /* a tier's policy: a miss passes on (a NetworkPolicy's denies) */
#define STAGE_ANY 0x20000000u    /* the policy has entries keyed by ANY: look there on a miss */
#define STAGE_POLICY 0x1fffffffu

/* a policy entry's value */
#define ACT_ALLOW 1
#define ACT_DENY 2
#define ACT_PASS 3
#define ACT_KEEP 0x100 /* with ACT_DENY: a tier's Deny that keeps existing connections */
/* side_denies' answer: the denying stage's policy, and whether its entry keeps */
#define SIDE_KEPT 0x80000000u

#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define PROTO_SCTP 132

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define DIR_INGRESS 1
#define DIR_EGRESS 2

#define CT_CLOSING 1
#define CT_REPLIED 2 /* a packet of the reply direction was seen */
#define CT_ORIG_B 4  /* the connection was opened from the key's dst side */
/* How many of `ct_live`'s entries the connections of one port may hold: beyond it, a
 * port's connections stay in `ct`, evictable, and never push another port's out. */
#define CT_LIVE_PER_PORT 4096

/* what a guard binds its port to */
#define GUARD_MAC 1
#define GUARD_V4 2
#define GUARD_V6 4
#define ARP_ETHER 1 /* ARPHRD_ETHER (linux/if_arp.h pulls in libc headers) */

#define SEC_NS 1000000000ull

struct ip4_key {
	__u32 prefixlen; /* 8 (slot) + prefix length */
	__u8 slot;
	__u8 addr[4];
	__u8 pad[3];
};

struct ip6_key {
	__u32 prefixlen;
	__u8 slot;
	__u8 addr[16];
	__u8 pad[3];
};

struct ip_info {
	__u32 identity;
	__u32 ingress; /* the map entry's policy (read back by the loader only) */
	__u32 egress;
	__u32 in_stage[MAX_STAGES]; /* policies judging ingress in turn, 0: no more */
	__u32 eg_stage[MAX_STAGES];
};

struct policy_key {
	__u32 prefixlen; /* 64 + (8 if protocol) + port prefix bits */
	__be32 policy;   /* slot in the top bit */
	__be32 identity;
	__u8 proto;
	__u8 port[2];   /* big endian */
	__u8 pad;
};

struct config {
	__u32 slot;
	__u32 log_rate;  /* denied-packet events per second, 0: none */
	__u64 generation;
};

struct ct_key {
	__u8 family;
	__u8 proto;
	__u16 pad;
	__be16 sport;
	__be16 dport;
	__u32 src[4];
	__u32 dst[4];
};

struct ct_value {
	__u64 seen_ns;
	__u64 generation;
	__u32 flags;
	__u32 owner; /* the port (ifindex) whose packet made the entry */
};

struct frag_key {
	__u8 family;
	__u8 proto; /* IPv4: the protocol; IPv6: the fragment header's next header */
	__u16 pad;
	__u32 id;   /* IPv4: 16 bits, IPv6: 32 */
	__u32 src[4];
	__u32 dst[4];
};

struct frag_value {
	__be16 sport;
	__be16 dport;
	__u8 proto; /* the transport protocol of the datagram */
	__u8 pad[3];
};

struct event {
	__u64 ts_ns;
	__u32 ifindex;
	__u32 policy;
	__u8 family;
	__u8 proto;
	__u8 direction;
	__u8 tcp_flags;
	__be16 sport;
	__be16 dport;
	__u8 src[16];
	__u8 dst[16];
	__u8 hook;  /* 1: leaving the pod (tc ingress), 2: entering it (tc egress) */
	__u8 pad[7];
};

struct meta_key {
	char name[28];
	__u32 chunk;
};

struct meta_value {
	__u32 len;
	__u8 data[508];
};

struct guard {
	__u8 mac[6];
	__u8 flags;      /* GUARD_MAC, GUARD_V4, GUARD_V6: which of the below hold */
	__u8 pad;
	__u32 addr4;     /* network order, as the packet's */
	__u32 addr6[4];
};

/* mac_port: a guarded pod's MAC -> its port and the port's bridge */
struct mac_key {
	__u8 mac[6];
	__u16 pad;
};

struct mac_port {
	__u32 port;   /* the host side's ifindex */
	__u32 bridge; /* its master's */
};

struct rate {
	__u64 window;
	__u64 count;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(key_size, sizeof(struct ip4_key));
	__uint(value_size, sizeof(struct ip_info));
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ipcache4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(key_size, sizeof(struct ip6_key));
	__uint(value_size, sizeof(struct ip_info));
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ipcache6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(key_size, sizeof(struct policy_key));
	__uint(value_size, sizeof(__u32));
	__uint(max_entries, 1 << 22);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct config);
	__uint(max_entries, 1);
} config SEC(".maps");

/* Runs in flight, per CPU: bumped before a run reads the slot and after its last
 * read of the slot's entries (odd in between; tc programs do not nest on a CPU).
 * The loader waits, after a flip, only for the CPUs it finds odd to move on,
 * instead of a whole RCU grace period. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 1 << 17);
} ct SEC(".maps");

/* Established connections (see the top of the file): a hash, never evicted; an entry
 * leaves when it expires, is cut, or its connection closes (back to `ct`). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 1 << 18);
} ct_live SEC(".maps");

/* How many entries of `ct_live` each port's connections hold (the loader recounts) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1 << 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ct_owners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
	__uint(max_entries, 1 << 13);
} frag SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct meta_key);
	__type(value, struct meta_value);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct rate);
	__uint(max_entries, 1);
} ratelimit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* the port's ifindex (skb->ifindex at its tc ingress) */
	__type(value, struct guard);
	__uint(max_entries, 1 << 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} guard SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct mac_key);
	__type(value, struct mac_port);
	__uint(max_entries, 1 << 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} mac_port SEC(".maps");

/* allowed new, denied new, conntrack hits, revalidated, cut, passed (not IP, ND),
 * fragments dropped (no allowed first fragment seen), frames a guard dropped */
#define STAT_ALLOWED 0
#define STAT_DENIED 1
#define STAT_CT 2
#define STAT_REJUDGED 3
#define STAT_CUT 4
#define STAT_OTHER 5
#define STAT_FRAG_DROPPED 6
#define STAT_SPOOFED 7
#define STAT_MAX 8

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_MAX);
} stats SEC(".maps");

struct packet {
	__u8 family;
	__u8 proto;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 fragment;  /* a non-first fragment: no transport header */
	__u8 first_fragment; /* offset 0, more fragments to come */
	__u8 frag_proto; /* the protocol field of the fragment: part of its datagram's key */
	__u32 frag_id;
	__be16 sport;
	__be16 dport;
	__u32 src[4];
	__u32 dst[4];
	__u32 l4_off;
};

struct verdict {
	__u32 policy;
	__u8 direction; /* 0: allowed */
};

/* A fetching atomic is fully ordered (the BPF memory model; lock xadd on x86, ldaddal
 * on arm64): the bump as a run starts is seen before `config` is read, and every read of
 * a slot before the bump as it ends. With the loader's barrier between its flip and its
 * read of the counts, either the run reads the new slot or the loader sees it odd. */
static __always_inline __u64 *run_starts(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&inflight, &zero);
	if (n) {
		__u64 seq = __sync_fetch_and_add(n, 1);
		barrier_var(seq); /* the value used: the fetching (ordered) form */
	}
	return n;
}

static __always_inline void run_ends(__u64 *n)
{
	if (n) {
		__u64 seq = __sync_fetch_and_add(n, 1);
		barrier_var(seq);
	}
}

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &which);
	if (v)
		*v += 1;
}

static __always_inline int lookup_ip(__u32 slot, __u8 family, const __u32 *addr,
				     struct ip_info *out)
{
	struct ip_info *info;
	if (family == 4) {
		struct ip4_key k = {.prefixlen = 40, .slot = (__u8)slot};
		__builtin_memcpy(k.addr, addr, 4);
		info = bpf_map_lookup_elem(&ipcache4, &k);
	} else {
		struct ip6_key k = {.prefixlen = 136, .slot = (__u8)slot};
		__builtin_memcpy(k.addr, addr, 16);
		info = bpf_map_lookup_elem(&ipcache6, &k);
	}
	if (!info) {
		__builtin_memset(out, 0, sizeof(*out));
		out->identity = family == 4 ? WORLD4 : WORLD6;
		return 0;
	}
	*out = *info;
	return 1;
}

/* A stage's action for the peer: its identity's entry, else ANY's when the policy has
 * any (so a stage is one lookup unless a rule has no peer condition), else what a miss
 * means for it: a tier's rules did not match (pass on), a NetworkPolicy's did not allow. */
static __always_inline __u32 policy_action(__u32 slot, __u32 stage, __u32 identity,
					   __u8 family, __u8 proto, __be16 port)
{
	struct policy_key k = {
		.prefixlen = 88,
		.policy = bpf_htonl((stage & STAGE_POLICY) | (slot ? SLOT_BIT : 0)),
		.identity = bpf_htonl(identity),
		.proto = proto,
	};
	__u32 *v;
	__builtin_memcpy(k.port, &port, 2);
	v = bpf_map_lookup_elem(&policy, &k);
	if (v)
		return *v;
	if (stage & STAGE_ANY) {
		k.identity = bpf_htonl(family == 4 ? ANY4 : ANY6);
		v = bpf_map_lookup_elem(&policy, &k);
		if (v)
			return *v;
	}
	return (stage & STAGE_TIER) ? ACT_PASS : ACT_DENY;
}

/* The policy of the stage that denies a side, 0 when the side passes: a stage's allow
 * or deny decides, a pass goes on to the next one. SIDE_KEPT is added when the
 * deciding entry is a Deny that keeps (ACT_KEEP). */
static __always_inline __u32 side_denies(__u32 slot, const __u32 *stage, __u32 identity,
					 __u8 family, __u8 proto, __be16 port)
{
#pragma unroll
	for (int i = 0; i < MAX_STAGES; i++) {
		__u32 act;
		if (!stage[i])
			return 0;
		act = policy_action(slot, stage[i], identity, family, proto, port);
		if (act == ACT_ALLOW)
			return 0;
		if (act != ACT_PASS)
			return (stage[i] & STAGE_POLICY) | ((act & ACT_KEEP) ? SIDE_KEPT : 0);
	}
	return 0;
}

/* Whether a policy's chain keeps the connections it would now deny (a NetworkPolicy
 * annotated stockade.io/existing-connections: keep, whose denial is a miss and so has no
 * entry to carry ACT_KEEP): its marker entry, which no packet's identity matches. */
static __always_inline int policy_keeps(__u32 slot, __u32 pol)
{
	struct policy_key k = {
		.prefixlen = 88,
		.policy = bpf_htonl(pol | (slot ? SLOT_BIT : 0)),
		.identity = bpf_htonl(KEEP_MARK),
	};
	return bpf_map_lookup_elem(&policy, &k) != 0;
}

/* Whether side_denies' answer cuts: a denial that neither its entry nor its policy keeps. */
static __always_inline int side_cuts(__u32 slot, __u32 pol)
{
	return pol && !(pol & SIDE_KEPT) && !policy_keeps(slot, pol);
}

/* A tracked connection judged again under a new policy generation: cut it when a side
 * denies it and what decided that side (a tier's Deny entry, or the NetworkPolicy a pass
 * led to) does not keep it (when both deny, both must keep), as the agent's revoker
 * decides on nftables (agent/revoke.py, should_cut): only the deciding tier policy's
 * annotation keeps an Admin or Baseline Deny. */
static __always_inline int rejudge_cuts(__u32 slot, __u8 family, const __u32 *src,
					const __u32 *dst, __u8 proto, __be16 dport)
{
	struct ip_info s, d;
	__u32 pol;
	lookup_ip(slot, family, src, &s);
	lookup_ip(slot, family, dst, &d);
	pol = side_denies(slot, s.eg_stage, d.identity, family, proto, dport);
	if (side_cuts(slot, pol))
		return 1;
	pol = side_denies(slot, d.in_stage, s.identity, family, proto, dport);
	return side_cuts(slot, pol);
}

/* The nftables chains' verdict: the source's egress, then the destination's ingress;
 * the policy reported is the deciding stage's. */
static __always_inline void judge(__u32 slot, __u8 family, const __u32 *src, const __u32 *dst,
				  __u8 proto, __be16 dport, struct verdict *v)
{
	struct ip_info s, d;
	v->direction = 0;
	v->policy = 0;
	__u32 pol;
	lookup_ip(slot, family, src, &s);
	lookup_ip(slot, family, dst, &d);
	pol = side_denies(slot, s.eg_stage, d.identity, family, proto, dport);
	if (pol) {
		v->direction = DIR_EGRESS;
		v->policy = pol & STAGE_POLICY;
		return;
	}
	pol = side_denies(slot, d.in_stage, s.identity, family, proto, dport);
	if (pol) {
		v->direction = DIR_INGRESS;
		v->policy = pol & STAGE_POLICY;
	}
}

static __always_inline int has_ports(__u8 proto)
{
	return proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_SCTP;
}

static __always_inline int parse_l4(struct __sk_buff *skb, struct packet *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 off = p->l4_off;
	if (p->fragment)
		return 0;
	if (has_ports(p->proto)) {
		__u8 *l4 = data + off;
		if ((void *)(l4 + 4) > end)
			return -1;
		__builtin_memcpy(&p->sport, l4, 2);
		__builtin_memcpy(&p->dport, l4 + 2, 2);
		if (p->proto == PROTO_TCP) {
			if ((void *)(l4 + 14) > end)
				return -1;
			p->tcp_flags = l4[13];
		}
	} else if (p->proto == PROTO_ICMP || p->proto == PROTO_ICMPV6) {
		__u8 *l4 = data + off;
		if ((void *)(l4 + 8) > end)
			return -1;
		p->icmp_type = l4[0];
		/* echo request/reply: the identifier stands for both ports */
		if ((p->proto == PROTO_ICMP && (l4[0] == 8 || l4[0] == 0)) ||
		    (p->proto == PROTO_ICMPV6 && (l4[0] == 128 || l4[0] == 129))) {
			__builtin_memcpy(&p->sport, l4 + 4, 2);
			p->dport = p->sport;
		}
	}
	return 0;
}

static __always_inline int parse(struct __sk_buff *skb, struct packet *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return 1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return -1;
		if (ip->ihl < 5)
			return -1;
		p->family = 4;
		p->proto = ip->protocol;
		p->src[0] = ip->saddr;
		p->dst[0] = ip->daddr;
		__u16 frag_off = bpf_ntohs(ip->frag_off);
		p->fragment = (frag_off & 0x1fff) != 0;
		p->first_fragment = !p->fragment && (frag_off & 0x2000); /* MF */
		p->frag_proto = ip->protocol;
		p->frag_id = ip->id;
		p->l4_off = sizeof(*eth) + ip->ihl * 4;
		return parse_l4(skb, p);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return -1;
		p->family = 6;
		__builtin_memcpy(p->src, &ip6->saddr, 16);
		__builtin_memcpy(p->dst, &ip6->daddr, 16);
		__u8 next = ip6->nexthdr;
		__u32 off = sizeof(*eth) + sizeof(*ip6);
		/* extension headers: a bounded walk */
#pragma unroll
		for (int i = 0; i < 6; i++) {
			if (next == 0 || next == 43 || next == 60) { /* hop-by-hop, routing, dest */
				__u8 hdr[2];
				if (bpf_skb_load_bytes(skb, off, hdr, 2) < 0)
					return -1;
				next = hdr[0];
				off += (hdr[1] + 1) * 8;
			} else if (next == 44) { /* fragment */
				__u8 fh[8];
				if (bpf_skb_load_bytes(skb, off, fh, 8) < 0)
					return -1;
				next = fh[0];
				off += 8;
				__u16 field = (fh[2] << 8) | fh[3]; /* offset << 3 | M */
				p->frag_proto = next;
				__builtin_memcpy(&p->frag_id, fh + 4, 4);
				if (field & 0xfff8) {
					/* a later fragment: what follows is payload, not headers */
					p->fragment = 1;
					break;
				}
				p->first_fragment = field & 1;
			} else {
				break;
			}
		}
		p->proto = next;
		p->l4_off = off;
		if (off > 1024)
			return -1;
		return parse_l4(skb, p);
	}
	return 1; /* not IP: ARP and the like pass */
}

static __always_inline void ct_key_of(struct ct_key *k, __u8 family, __u8 proto,
				      const __u32 *src, const __u32 *dst, __be16 sport,
				      __be16 dport)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = family;
	k->proto = proto;
	k->sport = sport;
	k->dport = dport;
	__builtin_memcpy(k->src, src, 16);
	__builtin_memcpy(k->dst, dst, 16);
}

/* The tuple's key in normal form: the side with the lower address (compared word by
 * word), then the lower port, first. Returns 1 when the packet goes from the key's dst
 * side to its src side. compile/bpf.py's ct_normal orders keys the same way. */
static __always_inline int ct_normal_key(struct ct_key *k, __u8 family, __u8 proto,
					 const __u32 *src, const __u32 *dst, __be16 sport,
					 __be16 dport)
{
	int swap = sport > dport;
#pragma unroll
	for (int i = 3; i >= 0; i--)
		if (src[i] != dst[i])
			swap = src[i] > dst[i];
	if (swap)
		ct_key_of(k, family, proto, dst, src, dport, sport);
	else
		ct_key_of(k, family, proto, src, dst, sport, dport);
	return swap;
}

static __always_inline __u64 ct_timeout(__u8 proto, __u32 flags)
{
	if (proto == PROTO_TCP)
		return (flags & CT_CLOSING) ? 10 * SEC_NS : 86400 * SEC_NS;
	if (proto == PROTO_UDP || proto == PROTO_SCTP)
		return 180 * SEC_NS;
	return 60 * SEC_NS;
}

static __always_inline int ct_expired(const struct ct_key *k, const struct ct_value *v,
				      __u64 now)
{
	/* seen_ns may be ahead of this CPU's now (another CPU stored it a moment ago):
	 * unsigned, now - seen_ns would wrap and expire a live connection */
	return now > v->seen_ns && now - v->seen_ns > ct_timeout(k->proto, v->flags);
}

/* One entry of `ct_live` fewer for `owner`'s share. */
static __always_inline void ct_release(__u32 owner)
{
	__u32 *n = bpf_map_lookup_elem(&ct_owners, &owner);
	if (n && *n > 0)
		__sync_fetch_and_add(n, -1);
}

/* A live entry for the tuple in `ct` (new connections), or NULL. */
static __always_inline struct ct_value *ct_find(struct ct_key *k, __u64 now)
{
	struct ct_value *v = bpf_map_lookup_elem(&ct, k);
	if (!v)
		return 0;
	if (ct_expired(k, v, now)) {
		bpf_map_delete_elem(&ct, k);
		return 0;
	}
	return v;
}

/* A live entry for the tuple in `ct_live` (established connections), or NULL. */
static __always_inline struct ct_value *ct_live_find(struct ct_key *k, __u64 now)
{
	struct ct_value *v = bpf_map_lookup_elem(&ct_live, k);
	if (!v)
		return 0;
	if (ct_expired(k, v, now)) {
		__u32 owner = v->owner;
		if (bpf_map_delete_elem(&ct_live, k) == 0)
			ct_release(owner);
		return 0;
	}
	return v;
}

/* A connection established (a reply seen, then its originator again): its entry moves
 * from `ct`, where a flood of new connections could evict it, to `ct_live`, where
 * nothing does, while its port's share is not used up. */
static __always_inline void ct_promote(struct ct_key *k, struct ct_value *e)
{
	struct ct_value v = *e;
	__u32 one = 1;
	__u32 *n = bpf_map_lookup_elem(&ct_owners, &v.owner);
	if (n && *n >= CT_LIVE_PER_PORT)
		return;
	if (bpf_map_update_elem(&ct_live, k, &v, BPF_NOEXIST) != 0)
		return; /* full, or another CPU moved it a moment ago */
	if (n)
		__sync_fetch_and_add(n, 1);
	else if (bpf_map_update_elem(&ct_owners, &v.owner, &one, BPF_NOEXIST) != 0) {
		n = bpf_map_lookup_elem(&ct_owners, &v.owner); /* another CPU made it */
		if (n)
			__sync_fetch_and_add(n, 1);
	}
	bpf_map_delete_elem(&ct, k);
}

/* A closing connection goes back to `ct`, whose LRU ages it out: `ct_live` holds open
 * connections only, and needs no sweeping for the ones that closed. */
static __always_inline void ct_demote(struct ct_key *k, struct ct_value *e)
{
	struct ct_value v = *e;
	bpf_map_update_elem(&ct, k, &v, BPF_ANY);
	if (bpf_map_delete_elem(&ct_live, k) == 0)
		ct_release(v.owner);
}

/* Whether the tuple (in normal form) is a tracked connection (either map). */
static __always_inline int ct_tracked(struct ct_key *k, __u64 now)
{
	return ct_live_find(k, now) != 0 || ct_find(k, now) != 0;
}

static __always_inline int related_icmp(struct __sk_buff *skb, struct packet *p, __u64 now)
{
	/* ICMP errors carry the offending packet: pass them if its connection is tracked. */
	int v4 = p->proto == PROTO_ICMP &&
		 (p->icmp_type == 3 || p->icmp_type == 11 || p->icmp_type == 12);
	int v6 = p->proto == PROTO_ICMPV6 && p->icmp_type >= 1 && p->icmp_type <= 4;
	struct ct_key k;
	__u32 src[4] = {}, dst[4] = {};
	__u8 proto;
	__be16 ports[2] = {};
	__u32 off = p->l4_off + 8;
	if (!v4 && !v6)
		return 0;
	if (v4) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return 0;
		src[0] = ip.saddr;
		dst[0] = ip.daddr;
		proto = ip.protocol;
		off += (ip.ihl & 0xf) * 4;
	} else {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return 0;
		__builtin_memcpy(src, &ip6.saddr, 16);
		__builtin_memcpy(dst, &ip6.daddr, 16);
		proto = ip6.nexthdr;
		off += sizeof(ip6);
	}
	if (has_ports(proto)) {
		if (bpf_skb_load_bytes(skb, off, ports, 4) < 0)
			return 0;
	} else if (proto == PROTO_ICMP || proto == PROTO_ICMPV6) {
		__u8 icmp[6];
		if (bpf_skb_load_bytes(skb, off, icmp, 6) < 0)
			return 0;
		__builtin_memcpy(&ports[0], icmp + 4, 2);
		ports[1] = ports[0];
	}
	ct_normal_key(&k, p->family, proto, src, dst, ports[0], ports[1]);
	return ct_tracked(&k, now);
}

static __always_inline void report(struct __sk_buff *skb, struct packet *p, struct verdict *v,
				   struct config *cfg, __u8 hook)
{
	__u32 zero = 0;
	struct rate *r;
	struct event *e;
	__u64 now;
	if (!cfg->log_rate)
		return;
	r = bpf_map_lookup_elem(&ratelimit, &zero);
	if (!r)
		return;
	now = bpf_ktime_get_ns();
	if (now > r->window && now - r->window > SEC_NS) { /* window: maybe another CPU's */
		r->window = now;
		r->count = 0;
	}
	if (__sync_fetch_and_add(&r->count, 1) >= cfg->log_rate)
		return;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = now;
	e->ifindex = skb->ifindex;
	e->policy = v->policy;
	e->family = p->family;
	e->proto = p->proto;
	e->direction = v->direction;
	e->tcp_flags = p->tcp_flags;
	e->sport = p->sport;
	e->dport = p->dport;
	__builtin_memcpy(e->src, p->src, 16);
	__builtin_memcpy(e->dst, p->dst, 16);
	e->hook = hook;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void frag_key_of(struct frag_key *k, const struct packet *p)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = p->family;
	k->proto = p->frag_proto;
	k->id = p->frag_id;
	__builtin_memcpy(k->src, p->src, 16);
	__builtin_memcpy(k->dst, p->dst, 16);
}

/* A first fragment passes: its datagram's later fragments will be judged with its ports. */
static __always_inline void frag_record(const struct packet *p)
{
	struct frag_key k;
	struct frag_value v = {.sport = p->sport, .dport = p->dport, .proto = p->proto};
	if (!p->first_fragment)
		return;
	frag_key_of(&k, p);
	bpf_map_update_elem(&frag, &k, &v, BPF_ANY);
}

/* A first fragment is dropped: an older record under the same IP id must not let its
 * datagram's later fragments through. */
static __always_inline void frag_forget(const struct packet *p)
{
	struct frag_key k;
	if (!p->first_fragment)
		return;
	frag_key_of(&k, p);
	bpf_map_delete_elem(&frag, &k);
}

static __always_inline int same_addr(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* Two loads a side, not six. In the packet they are unaligned, as parse's loads of IP
 * addresses already are; on the stack the verifier wants them aligned (arp_spoofed). */
static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	return *(const __u32 *)a == *(const __u32 *)b &&
	       *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

static __always_inline int link_local6(const __u32 *a)
{
	return (a[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000);
}

static __always_inline int unspecified6(const __u32 *a)
{
	return !(a[0] | a[1] | a[2] | a[3]);
}

static __always_inline int own6(const struct guard *g, const __u32 *a)
{
	return (g->flags & GUARD_V6) && same_addr(a, g->addr6);
}

/* A link-local address the port may use: with its MAC known, the one the kernel derives
 * from it (EUI-64: fe80::/64, the MAC with ff:fe in its middle, the universal/local bit
 * flipped), which stockade's plumbing keeps; else any. */
static __always_inline int own_link_local6(const struct guard *g, const __u32 *a)
{
	if (!(g->flags & GUARD_MAC))
		return link_local6(a);
	__u8 want[16] __attribute__((aligned(4))) = {
		0xfe, 0x80, 0, 0, 0, 0, 0, 0, g->mac[0] ^ 0x02, g->mac[1], g->mac[2], 0xff, 0xfe,
		g->mac[3], g->mac[4], g->mac[5]};
	return same_addr(a, (const __u32 *)want);
}

/* MLD (queries, reports, done, v2 reports), router solicitations, neighbour
 * solicitations and advertisements: what a host sends from link-local or ::. */
static __always_inline int nd_or_mld(__u8 type)
{
	return (type >= 130 && type <= 133) || type == 135 || type == 136 || type == 143;
}

/* An ARP frame claims its sender's addresses: only an Ethernet/IPv4 one can be held to
 * the pod's, so any other (or a short one) is refused. */
static __always_inline int arp_spoofed(struct __sk_buff *skb, const struct guard *g)
{
	__u8 arp[28] __attribute__((aligned(4))); /* the sender's MAC at 8: same_mac's loads */
	__u32 spa;
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), arp, sizeof(arp)) < 0)
		return 1;
	if (arp[0] != 0 || arp[1] != ARP_ETHER || arp[2] != 0x08 || arp[3] != 0 ||
	    arp[4] != ETH_ALEN || arp[5] != 4)
		return 1;
	if ((g->flags & GUARD_MAC) && !same_mac(arp + 8, g->mac))
		return 1;
	__builtin_memcpy(&spa, arp + 14, 4);
	return spa != 0 && (!(g->flags & GUARD_V4) || spa != g->addr4);
}

/* Whether a frame's source MAC is a guarded pod's whose port is not this one: the bridge
 * would learn it here and forward that pod's frames to this port. Asked of ports bound to
 * no MAC, guarded (an endpoint declared with a port and no MAC) or not (a pod of no
 * endpoint): nothing else holds their source MACs. */
static __always_inline int mac_of_another_port(struct __sk_buff *skb, const struct ethhdr *eth)
{
	struct mac_key k = {};
	__builtin_memcpy(k.mac, eth->h_source, ETH_ALEN);
	struct mac_port *owner = bpf_map_lookup_elem(&mac_port, &k);
	return owner && owner->port != skb->ifindex;
}

/* Whether a frame leaving a guarded port claims what its pod does not own (see the top
 * of the file); `p` and `rc` are parse's (rc >= 0: a truncated IP header is dropped
 * before). */
static __always_inline int spoofed(struct __sk_buff *skb, const struct guard *g,
				   const struct packet *p, int rc)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	/* a tag would put the frame on a segment the guard knows nothing of */
	if ((void *)(eth + 1) > end || skb->vlan_present)
		return 1;
	if ((g->flags & GUARD_MAC) && !same_mac(eth->h_source, g->mac))
		return 1;
	if (!(g->flags & GUARD_MAC) && mac_of_another_port(skb, eth))
		return 1;
	/* not IP: only ARP can be held to the pod's addresses (a tag in the data, which
	 * would hide what follows it, is another ethertype too) */
	if (rc > 0)
		return eth->h_proto != bpf_htons(ETH_P_ARP) || arp_spoofed(skb, g);
	/* to every pod at once (broadcast, multicast): no pod's address is its destination,
	 * so no pod's ingress policy would judge it; only neighbour discovery and MLD */
	int group = eth->h_dest[0] & 1;
	if (p->family == 4)
		return !(g->flags & GUARD_V4) || p->src[0] != g->addr4 || group;
	/* link-local and :: sources: neighbour discovery, DAD, MLD only (below). No policy
	 * names those addresses: pods on one bridge share a link, and a pod's datagram
	 * from its link-local address to another's would pass around the other's
	 * isolation. */
	int own = own6(g, p->src);
	if (!own && !own_link_local6(g, p->src) && !unspecified6(p->src))
		return 1;
	if (p->fragment)
		return !own; /* payload: its first fragment was held to the rules below */
	/* the walk ran out of extension headers: what follows could be an advertisement */
	if (p->proto == 0 || p->proto == 43 || p->proto == 44 || p->proto == 60)
		return 1;
	/* a pod is no router: its advertisements would route its neighbours (and the host)
	 * through it, its redirects move their routes (CVE-2020-10749) */
	if (p->proto == PROTO_ICMPV6 && (p->icmp_type == 134 || p->icmp_type == 137))
		return 1;
	if ((!own || group) && !(p->proto == PROTO_ICMPV6 && nd_or_mld(p->icmp_type)))
		return 1;
	if (p->proto == PROTO_ICMPV6 &&
	    (p->icmp_type == 136 || (p->icmp_type == 135 && unspecified6(p->src)))) {
		/* a neighbour advertisement claims its target, and a duplicate address
		 * detection probe (a solicitation from ::) makes the target's owner, still
		 * detecting, give it up: it must be the pod's own, global or link-local */
		__u32 target[4];
		if (bpf_skb_load_bytes(skb, p->l4_off + 8, target, sizeof(target)) < 0)
			return 1;
		return !own6(g, target) && !own_link_local6(g, target);
	}
	return 0;
}

/* Whether an IP frame to one host entering a guarded port is for an address the pod
 * would take as its own though no policy names it: a broadcast or multicast address
 * (written to the pod's MAC), its link-local address. Its ingress policy judges none
 * of those: only its own addresses pass, and neighbour discovery and MLD to any.
 * Frames to every host are held by the sender's guard. */
static __always_inline int misdirected(struct __sk_buff *skb, const struct guard *g,
				       const struct packet *p, int rc)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if (rc > 0 || (void *)(eth + 1) > end || (eth->h_dest[0] & 1))
		return 0;
	if (p->family == 4)
		return !(g->flags & GUARD_V4) || p->dst[0] != g->addr4;
	return !own6(g, p->dst) && !(p->proto == PROTO_ICMPV6 && nd_or_mld(p->icmp_type));
}

/* Whether a frame from an unguarded port carries a guarded pod's MAC (see
 * mac_of_another_port). */
static __always_inline int unguarded_theft(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	return (void *)(eth + 1) <= end && mac_of_another_port(skb, eth);
}

/* `g`: the port's guard, or NULL (an unguarded port); `hook` 1 from the pod, 2 to it. */
static __always_inline int process(struct __sk_buff *skb, __u8 hook, const struct guard *g)
{
	struct packet p = {};
	struct ct_key k;
	struct ct_value *e;
	struct verdict v;
	struct config *cfg;
	__u32 zero = 0;
	__u64 now;
	int rc = parse(skb, &p);
	if (rc < 0)
		return TC_ACT_SHOT; /* a truncated IP header: nothing to judge it by */
	if (g && (hook == 1 ? spoofed(skb, g, &p, rc) : misdirected(skb, g, &p, rc))) {
		count(STAT_SPOOFED);
		return TC_ACT_SHOT;
	}
	if (!g && hook == 1 && unguarded_theft(skb)) {
		count(STAT_SPOOFED);
		return TC_ACT_SHOT;
	}
	if (rc > 0) {
		count(STAT_OTHER);
		return TC_ACT_UNSPEC;
	}
	if (p.proto == PROTO_ICMPV6 && (p.icmp_type == 135 || p.icmp_type == 136)) {
		count(STAT_OTHER);
		return TC_ACT_UNSPEC;
	}
	if (same_addr(p.src, p.dst))
		return TC_ACT_UNSPEC; /* a pod may always talk to itself */
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return TC_ACT_SHOT;
	/* The generation a connection is stamped with: read once, before any slot is (the
	 * loader makes a flip's slot seen before its generation), so a connection judged by
	 * the old slot is never stamped with the new generation, which would spare it the
	 * new policy's judgement. Read again later, a flip between the two reads did. */
	__u64 gen = cfg->generation;
	__u64 *run;
	asm volatile("" ::: "memory"); /* the read above stays above */
	int cut;
	/* The coarse clock (updated each tick, a few ms): conntrack's timeouts are seconds,
	 * and reading the TSC for every packet was a sixth of the programs' time in a VM
	 * (perf, connect-request-response); the same CLOCK_MONOTONIC base, so entries
	 * written with either clock compare. */
	now = bpf_ktime_get_coarse_ns();
	if (p.fragment) {
		/* no transport header: the ports are those its first fragment passed with,
		 * and without a first fragment seen passing, nothing to judge by */
		struct frag_key fk;
		struct frag_value *fv;
		frag_key_of(&fk, &p);
		fv = bpf_map_lookup_elem(&frag, &fk);
		if (!fv) {
			count(STAT_FRAG_DROPPED);
			return TC_ACT_SHOT;
		}
		p.sport = fv->sport;
		p.dport = fv->dport;
		p.proto = fv->proto;
	}

	/* 1. conntrack: established connections first, then new ones, one lookup each
	 * (the key in normal form stands for both directions). A SYN is never a reply:
	 * one against an entry's direction opens a connection of its own on the same
	 * tuple (the old one is over: its ends would not take a SYN), judged as new;
	 * passed, its entry replaces the old one. */
	int syn = p.proto == PROTO_TCP && (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	int live = 1, reply = 0, reopened = 0;
	__u32 old_owner = 0;
	int from_b = ct_normal_key(&k, p.family, p.proto, p.src, p.dst, p.sport, p.dport);
	e = ct_live_find(&k, now);
	if (!e) {
		live = 0;
		e = ct_find(&k, now);
	}
	if (e) {
		reply = !(e->flags & CT_ORIG_B) != !from_b;
		if (syn && reply) {
			reopened = live;
			old_owner = e->owner;
			e = 0;
		}
	}
	if (e) {
		if (e->generation != gen) {
			/* the policy changed since this connection was allowed: judge the
			 * direction it was opened in again (the key's, or its reverse with
			 * CT_ORIG_B); a denied one lives on if its denying sides keep
			 * connections */
			count(STAT_REJUDGED);
			int b = (e->flags & CT_ORIG_B) != 0;
			run = run_starts();
			cut = rejudge_cuts(cfg->slot, k.family, b ? k.dst : k.src, b ? k.src : k.dst,
					   k.proto, k.proto == PROTO_ICMP || k.proto == PROTO_ICMPV6
					   ? 0 : (b ? k.sport : k.dport));
			run_ends(run);
			if (cut) {
				__u32 owner = e->owner;
				if (!live)
					bpf_map_delete_elem(&ct, &k);
				else if (bpf_map_delete_elem(&ct_live, &k) == 0)
					ct_release(owner);
				count(STAT_CUT);
				frag_forget(&p);
				return TC_ACT_SHOT;
			}
			e->generation = gen;
		}
		e->seen_ns = now;
		if (p.proto == PROTO_TCP && (p.tcp_flags & (TCP_FIN | TCP_RST)))
			e->flags |= CT_CLOSING;
		if (reply)
			e->flags |= CT_REPLIED;
		if (live) {
			if (e->flags & CT_CLOSING)
				ct_demote(&k, e);
		} else if (!reply && !syn && (e->flags & (CT_REPLIED | CT_CLOSING)) == CT_REPLIED) {
			ct_promote(&k, e);
		}
		count(STAT_CT);
		frag_record(&p);
		return TC_ACT_UNSPEC;
	}
	if (!p.fragment && related_icmp(skb, &p, now)) {
		count(STAT_CT);
		frag_record(&p);
		return TC_ACT_UNSPEC;
	}

	/* 2. a new connection */
	if (p.proto == PROTO_TCP &&
	    (p.tcp_flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK)) != TCP_SYN) {
		count(STAT_DENIED);
		frag_forget(&p);
		return TC_ACT_SHOT; /* mid-stream without conntrack: never a new connection */
	}
	run = run_starts();
	judge(cfg->slot, p.family, p.src, p.dst, p.proto,
	      has_ports(p.proto) ? p.dport : 0, &v);
	run_ends(run);
	if (v.direction) {
		count(STAT_DENIED);
		report(skb, &p, &v, cfg, hook);
		frag_forget(&p);
		return TC_ACT_SHOT;
	}
	count(STAT_ALLOWED);
	/* the old connection's entry (against this SYN's direction) gives way to this one */
	if (reopened && bpf_map_delete_elem(&ct_live, &k) == 0)
		ct_release(old_owner);
	struct ct_value nv = {.seen_ns = now, .generation = gen,
			      .flags = from_b ? CT_ORIG_B : 0, .owner = skb->ifindex};
	bpf_map_update_elem(&ct, &k, &nv, BPF_ANY);
	frag_record(&p);
	return TC_ACT_UNSPEC;
}

/* A frame `process` passed from a guarded port to another pod's MAC on the same bridge:
 * to that pod's port at once, as the bridge would forward it once it learned the MAC
 * (guards hold both ends to their MACs), without the bridge and the host's netfilter
 * hooks on the way (br_netfilter's: a tenth of a pair's connection rate in
 * bench/datapaths.py, more than this program's judgement). The destination's
 * `stockade_to_pod` runs as it would. Anything else (a group address, a
 * tag, another ethertype, a MAC no single port is bound to, a port of another bridge
 * or of one that filters VLANs: not in `mac_port`) takes the bridge. */
static __always_inline int deliver(struct __sk_buff *skb, const struct guard *g)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct mac_key k = {};
	struct mac_port *to, *from;
	if (!g || !(g->flags & GUARD_MAC) || (void *)(eth + 1) > end || skb->vlan_present ||
	    (eth->h_dest[0] & 1))
		return TC_ACT_UNSPEC;
	if (eth->h_proto != bpf_htons(ETH_P_IP) && eth->h_proto != bpf_htons(ETH_P_IPV6) &&
	    eth->h_proto != bpf_htons(ETH_P_ARP))
		return TC_ACT_UNSPEC;
	__builtin_memcpy(k.mac, eth->h_dest, ETH_ALEN);
	to = bpf_map_lookup_elem(&mac_port, &k);
	if (!to || to->port == skb->ifindex)
		return TC_ACT_UNSPEC;
	__builtin_memcpy(k.mac, g->mac, ETH_ALEN);
	from = bpf_map_lookup_elem(&mac_port, &k);
	if (!from || from->port != skb->ifindex || from->bridge != to->bridge)
		return TC_ACT_UNSPEC;
	return bpf_redirect(to->port, 0);
}

SEC("tc")
int stockade_from_pod(struct __sk_buff *skb)
{
	__u32 port = skb->ifindex;
	/* the one lookup guards cost each way: a miss is an unguarded port */
	const struct guard *g = bpf_map_lookup_elem(&guard, &port);
	int verdict = process(skb, 1, g);
	return verdict == TC_ACT_UNSPEC ? deliver(skb, g) : verdict;
}

SEC("tc")
int stockade_to_pod(struct __sk_buff *skb)
{
	__u32 port = skb->ifindex;
	return process(skb, 2, bpf_map_lookup_elem(&guard, &port));
}

char LICENSE[] SEC("license") = "GPL";
