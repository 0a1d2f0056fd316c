// RUN: dsv3c opt %s -p dsv3-mla-absorb,dsv3-kv-cache | filecheck %s --check-prefix=LATENT
// RUN: dsv3c opt %s -p dsv3-kv-cache | filecheck %s --check-prefix=NAIVE

// dsv3-kv-cache turns @model into one cached inference step: S new tokens at given positions, their keys written
// into the caches at sequence index %slot, attention over everything cached. What is cached follows from the
// attention form: after dsv3-mla-absorb, the latent c_kv (4) and the rope key (2); without it, per-head keys and
// values. Caches are state declared by name, threaded through the layer stack (stacked over its 2 layers like a
// parameter) and stored back; only the logits output is kept.

// LATENT-LABEL: func.func @model(%tokens: tensor<?x?xi32>, %positions: tensor<?x?xi32>, %slot: tensor<i32>) {
// Which position each cache slot holds (-1: empty), shared by all layers.
// LATENT-NEXT:    %positions_cache = dsv3.cache {name = "positions", axes = ["batch", "cache_seq"], fill = -1 : i64} : tensor<?x?xi32>
// LATENT-NEXT:    %key_positions = dsv3.cache_update %positions_cache, %positions, %slot
// LATENT-NEXT:    dsv3.cache_store %key_positions {name = "positions"}
// The tokens are the step's new tokens: no token window any more.
// LATENT:         %x = dsv3.embed %table, %tokens
// LATENT:         %dense_c_kv_cache = dsv3.cache {name = "dense.c_kv", axes = ["layers", "batch", "cache_seq", "kv_lora"]} : tensor<2x?x?x4xf32>
// LATENT-NEXT:    %dense_k_pe_cache = dsv3.cache {name = "dense.k_pe", axes = ["layers", "batch", "cache_seq", "kv_rope"]} : tensor<2x?x?x2xf32>
// LATENT-NEXT:    %h, %dense_c_kv_next, %dense_k_pe_next = dsv3.layer_stack %x, %wq, %wkv_a, %wkv_b, %wo, %dense_c_kv_cache, %dense_k_pe_cache {count = 2 : i64, kind = "dense"}
// LATENT-SAME:      -> (tensor<?x?x8xf32>, tensor<2x?x?x4xf32>, tensor<2x?x?x2xf32>)
// LATENT-NEXT:    ^bb0({{.*}}, %c_kv_cache: tensor<?x?x4xf32>, %k_pe_cache: tensor<?x?x2xf32>):
// LATENT:           %q_lat = dsv3.einsum %q_nope, %w_uk
// LATENT-NEXT:      %c_kv_all = dsv3.cache_update %c_kv_cache, %c_kv, %slot
// LATENT-NEXT:      %k_pe_all = dsv3.cache_update %k_pe_cache, %k_pe, %slot
// LATENT-NEXT:      %o_lat = dsv3.latent_attention %q_lat, %q_pe, %c_kv_all, %k_pe_all, %positions, %key_positions
// LATENT:           dsv3.yield %next, %c_kv_all, %k_pe_all
// LATENT-NEXT:    }
// LATENT-NEXT:    dsv3.cache_store %dense_c_kv_next {name = "dense.c_kv"} : tensor<2x?x?x4xf32>
// LATENT-NEXT:    dsv3.cache_store %dense_k_pe_next {name = "dense.k_pe"} : tensor<2x?x?x2xf32>
// LATENT:         dsv3.output %logits {name = "logits", role = #dsv3<role logits>}
// LATENT-NEXT:    func.return

// Naive: per-head k_nope [2 heads, 2] and v [2 heads, 3] are cached beside k_pe, and the attention reads them.
// NAIVE:          %dense_k_nope_cache = dsv3.cache {name = "dense.k_nope", axes = ["layers", "batch", "cache_seq", "heads", "kv_nope"]} : tensor<2x?x?x2x2xf32>
// NAIVE-NEXT:     %dense_k_pe_cache = dsv3.cache {name = "dense.k_pe", {{.*}} : tensor<2x?x?x2xf32>
// NAIVE-NEXT:     %dense_v_cache = dsv3.cache {name = "dense.v", axes = ["layers", "batch", "cache_seq", "heads", "kv_v"]} : tensor<2x?x?x2x3xf32>
// NAIVE:            %kv_up = dsv3.matmul %c_kv, %lwkv_b
// NAIVE:            %k_nope_all = dsv3.cache_update %k_nope_cache, %k_nope, %slot
// NAIVE-NEXT:       %k_pe_all = dsv3.cache_update %k_pe_cache, %k_pe, %slot
// NAIVE-NEXT:       %v_all = dsv3.cache_update %v_cache, %v, %slot
// NAIVE-NEXT:       %attn = dsv3.masked_attention %q_nope, %q_pe, %k_nope_all, %k_pe_all, %v_all, %positions, %key_positions
// NAIVE:            dsv3.yield %next, %k_nope_all, %k_pe_all, %v_all
// NAIVE-NOT:      lm_loss

builtin.module {
  func.func @model(%tokens: tensor<?x?xi32>) {
    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %positions = dsv3.positions %ids : (tensor<?x?xi32>) -> tensor<?x?xi32>
    %table = dsv3.param {name = "embed", axes = ["vocab", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<16x8xf32>
    %x = dsv3.embed %table, %ids : (tensor<16x8xf32>, tensor<?x?xi32>) -> tensor<?x?x8xf32>
    %wq = dsv3.param {name = "dense.wq", axes = ["layers", "embed", "q_heads"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x8x8xf32>
    %wkv_a = dsv3.param {name = "dense.wkv_a", axes = ["layers", "embed", "kv_lora"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x8x6xf32>
    %wkv_b = dsv3.param {name = "dense.wkv_b", axes = ["layers", "kv_lora", "kv_heads"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x4x10xf32>
    %wo = dsv3.param {name = "dense.wo", axes = ["layers", "heads", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x6x8xf32>
    %h = dsv3.layer_stack %x, %wq, %wkv_a, %wkv_b, %wo {count = 2 : i64, kind = "dense"} : (tensor<?x?x8xf32>, tensor<2x8x8xf32>, tensor<2x8x6xf32>, tensor<2x4x10xf32>, tensor<2x6x8xf32>) -> tensor<?x?x8xf32> {
    ^bb0(%hin: tensor<?x?x8xf32>, %lwq: tensor<8x8xf32>, %lwkv_a: tensor<8x6xf32>, %lwkv_b: tensor<4x10xf32>, %lwo: tensor<6x8xf32>):
      %q_all = dsv3.matmul %hin, %lwq : (tensor<?x?x8xf32>, tensor<8x8xf32>) -> tensor<?x?x8xf32>
      %q = dsv3.split_heads %q_all {heads = 2 : i64} : (tensor<?x?x8xf32>) -> tensor<?x?x2x4xf32>
      %q_nope = dsv3.slice %q {start = 0 : i64, size = 2 : i64} : (tensor<?x?x2x4xf32>) -> tensor<?x?x2x2xf32>
      %q_rot = dsv3.slice %q {start = 2 : i64, size = 2 : i64} : (tensor<?x?x2x4xf32>) -> tensor<?x?x2x2xf32>
      %q_pe = dsv3.rope %q_rot, %positions {theta = 1.000000e+04 : f64, layout = #dsv3<rope_layout interleaved>} : (tensor<?x?x2x2xf32>, tensor<?x?xi32>) -> tensor<?x?x2x2xf32>
      %kv = dsv3.matmul %hin, %lwkv_a : (tensor<?x?x8xf32>, tensor<8x6xf32>) -> tensor<?x?x6xf32>
      %c_kv = dsv3.slice %kv {start = 0 : i64, size = 4 : i64} : (tensor<?x?x6xf32>) -> tensor<?x?x4xf32>
      %k_rot = dsv3.slice %kv {start = 4 : i64, size = 2 : i64} : (tensor<?x?x6xf32>) -> tensor<?x?x2xf32>
      %k_pe = dsv3.rope %k_rot, %positions {theta = 1.000000e+04 : f64, layout = #dsv3<rope_layout interleaved>} : (tensor<?x?x2xf32>, tensor<?x?xi32>) -> tensor<?x?x2xf32>
      %kv_up = dsv3.matmul %c_kv, %lwkv_b : (tensor<?x?x4xf32>, tensor<4x10xf32>) -> tensor<?x?x10xf32>
      %kv_heads = dsv3.split_heads %kv_up {heads = 2 : i64} : (tensor<?x?x10xf32>) -> tensor<?x?x2x5xf32>
      %k_nope = dsv3.slice %kv_heads {start = 0 : i64, size = 2 : i64} : (tensor<?x?x2x5xf32>) -> tensor<?x?x2x2xf32>
      %v = dsv3.slice %kv_heads {start = 2 : i64, size = 3 : i64} : (tensor<?x?x2x5xf32>) -> tensor<?x?x2x3xf32>
      %attn = dsv3.attention %q_nope, %q_pe, %k_nope, %k_pe, %v {scale = 5.000000e-01 : f64} : (tensor<?x?x2x2xf32>, tensor<?x?x2x2xf32>, tensor<?x?x2x2xf32>, tensor<?x?x2xf32>, tensor<?x?x2x3xf32>) -> tensor<?x?x2x3xf32>
      %o = dsv3.merge_heads %attn : (tensor<?x?x2x3xf32>) -> tensor<?x?x6xf32>
      %out = dsv3.matmul %o, %lwo : (tensor<?x?x6xf32>, tensor<6x8xf32>) -> tensor<?x?x8xf32>
      %next = dsv3.add %hin, %out : (tensor<?x?x8xf32>, tensor<?x?x8xf32>) -> tensor<?x?x8xf32>
      dsv3.yield %next : tensor<?x?x8xf32>
    }
    %head = dsv3.param {name = "head", axes = ["embed", "vocab"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<8x16xf32>
    %logits = dsv3.matmul %h, %head : (tensor<?x?x8xf32>, tensor<8x16xf32>) -> tensor<?x?x16xf32>
    dsv3.output %logits {name = "logits", role = #dsv3<role logits>} : tensor<?x?x16xf32>
    %labels, %label_mask = dsv3.token_window %tokens {offset = 1 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %lm_loss = dsv3.cross_entropy %logits, %labels, %label_mask : (tensor<?x?x16xf32>, tensor<?x?xi32>, tensor<?x?xf32>) -> tensor<f32>
    dsv3.output %lm_loss {name = "lm_loss", role = #dsv3<role loss>, weight = 1.000000e+00 : f64} : tensor<f32>
    func.return
  }
}
