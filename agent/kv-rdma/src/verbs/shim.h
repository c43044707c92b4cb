/* Input to bindgen: rdma-core's verbs.h plus the shim below. */
#ifndef DLENGINE_KV_RDMA_SHIM_H
#define DLENGINE_KV_RDMA_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <infiniband/verbs.h>

/*
 * Out-of-line wrappers for verbs that rdma-core defines as `static inline` (or as macros
 * over inline helpers) in verbs.h. They have no symbol in libibverbs.so, so Rust cannot
 * call them directly. See shim.c for why a shim instead of the ops pointers.
 */
int dlk_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr);
int dlk_poll_cq(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc);
int dlk_query_port(struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *port_attr);
int dlk_query_gid_ex(struct ibv_context *context, uint32_t port_num, uint32_t gid_index,
                     struct ibv_gid_entry *entry);
struct ibv_mr *dlk_reg_mr(struct ibv_pd *pd, void *addr, size_t length, unsigned int access);

#endif
