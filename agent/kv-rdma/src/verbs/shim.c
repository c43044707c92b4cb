/*
 * Why a C shim rather than calling through `context->ops` from Rust:
 *
 * - ibv_post_send / ibv_poll_cq are one-line inlines over `ctx->ops.*`, and could be
 *   called through bindgen's function pointers. But ibv_query_port is a macro over an
 *   inline that finds the *extended* `struct verbs_context`, which lives in memory before
 *   `struct ibv_context` (container_of), and falls back to an exported symbol that takes
 *   a smaller, older `_compat_ibv_port_attr`. ibv_reg_mr is a macro that picks between two
 *   exported symbols depending on the access flags; ibv_query_gid_ex passes sizeof(entry).
 *   Re-implementing those rules in Rust would copy rdma-core internals that change
 *   between releases.
 * - Compiling the header's own inlines against the installed verbs.h means every call
 *   does exactly what a C program built on this machine would do, for any rdma-core
 *   version, at the cost of one C file built by the `cc` crate.
 *
 * Nothing here has logic of its own: each function is the inline it names.
 */
#include "shim.h"

int dlk_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr)
{
	return ibv_post_send(qp, wr, bad_wr);
}

int dlk_poll_cq(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc)
{
	return ibv_poll_cq(cq, num_entries, wc);
}

int dlk_query_port(struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *port_attr)
{
	return ibv_query_port(context, port_num, port_attr);
}

int dlk_query_gid_ex(struct ibv_context *context, uint32_t port_num, uint32_t gid_index,
                     struct ibv_gid_entry *entry)
{
	return ibv_query_gid_ex(context, port_num, gid_index, entry, 0);
}

struct ibv_mr *dlk_reg_mr(struct ibv_pd *pd, void *addr, size_t length, unsigned int access)
{
	return ibv_reg_mr(pd, addr, length, access);
}
