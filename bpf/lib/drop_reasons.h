/* Drop reasons. Programs return these negated; the numbers are Hubble's DropReason enum
 * (reference §5), so a drop carries its real reason from the datapath to `hubble observe`.
 * Every reason is defined here and only here: tests/unit/test_c_vocab.py checks this list
 * against cilium_py/datapath/reasons.py both ways. */
#ifndef CILIUMPY_DROP_REASONS_H
#define CILIUMPY_DROP_REASONS_H

#define REASON_FORWARDED 0 /* metrics key for forwarded packets */

#define DROP_INVALID_SIP 132
#define DROP_POLICY 133 /* no allow entry matched */
#define DROP_INVALID 134
#define DROP_CT_INVALID_HDR 135
#define DROP_CT_UNKNOWN_PROTO 137 /* not returned yet: conntrack handles every L4 it sees */
#define DROP_UNKNOWN_L3 139
#define DROP_WRITE_ERROR 141 /* a packet rewrite (NAT) failed */
#define DROP_UNKNOWN_TARGET 152 /* no local endpoint owns the destination */
#define DROP_CSUM_L3 153
#define DROP_CSUM_L4 154
#define DROP_CT_CREATE_FAILED 155
#define DROP_FRAG_NOSUPPORT 157
#define DROP_NO_SERVICE 158 /* a service frontend without any active backend */
#define DROP_NAT_NO_MAPPING 167 /* SNAT found no free port or could not store its entry */
#define DROP_FIB_LOOKUP 169 /* the node could not route a NodePort packet onward */
#define DROP_POLICY_DENY 181 /* an explicit deny entry matched */

#endif /* CILIUMPY_DROP_REASONS_H */
