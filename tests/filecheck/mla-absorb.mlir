// RUN: dsv3c opt %s -p dsv3-mla-absorb | filecheck %s
// RUN: dsv3c opt %s -p dsv3-mla-absorb | filecheck %s --check-prefix=GONE

// dsv3-mla-absorb re-associates MLA's two up-projections (REFERENCE.md section 2).
// Scores: q_nope . (c_kv W_UK) becomes (q_nope W_UK^T) . c_kv, so the query is projected into the 4-wide latent
// space (%q_lat) instead of the latent being expanded into per-head keys. Output: softmax(.) (c_kv W_UV) becomes
// (softmax(.) c_kv) W_UV, so attention averages the latent itself (%o_lat) and W_UV is applied once per query.
// W_UK and W_UV are views of the layer's `wkv_b` [C, H*(n+v)] = [4, 2*(2+3)] as [C, H, n] and [C, H, v].

// The query, the latent and the rope key are computed as before.
// CHECK:      %q_pe = dsv3.rope %q_rot, %positions
// CHECK-NEXT: %kv = dsv3.matmul %hin, %lwkv_a
// CHECK-NEXT: %c_kv = dsv3.slice %kv {start = 0 : i64, size = 4 : i64}
// CHECK-NEXT: %k_rot = dsv3.slice %kv {start = 4 : i64, size = 2 : i64}
// CHECK-NEXT: %k_pe = dsv3.rope %k_rot, %positions
// The per-head view of wkv_b, split into the key part W_UK (n = 2) and the value part W_UV (v = 3):
// CHECK-NEXT: %w_ukv = dsv3.split_heads %lwkv_b {heads = 2 : i64} : (tensor<4x10xf32>) -> tensor<4x2x5xf32>
// CHECK-NEXT: %w_uk = dsv3.slice %w_ukv {start = 0 : i64, size = 2 : i64} : (tensor<4x2x5xf32>) -> tensor<4x2x2xf32>
// CHECK-NEXT: %w_uv = dsv3.slice %w_ukv {start = 2 : i64, size = 3 : i64} : (tensor<4x2x5xf32>) -> tensor<4x2x3xf32>
// W_UK folded into the query: [B,S,H,n] x [C,H,n] -> [B,S,H,C].
// CHECK-NEXT: %q_lat = dsv3.einsum %q_nope, %w_uk {equation = "bshd,chd->bshc"} : (tensor<?x?x2x2xf32>, tensor<4x2x2xf32>) -> tensor<?x?x2x4xf32>
// Attention over the latent c_kv [B,T,4] and the shared rope key, masked causally by position; same scale.
// CHECK-NEXT: %o_lat = dsv3.latent_attention %q_lat, %q_pe, %c_kv, %k_pe, %positions, %positions {scale = 5.000000e-01 : f64} : (tensor<?x?x2x4xf32>, tensor<?x?x2x2xf32>, tensor<?x?x4xf32>, tensor<?x?x2xf32>, tensor<?x?xi32>, tensor<?x?xi32>) -> tensor<?x?x2x4xf32>
// W_UV applied after attention: [B,S,H,C] x [C,H,v] -> [B,S,H,v], what the naive attention returned.
// CHECK-NEXT: %attn = dsv3.einsum %o_lat, %w_uv {equation = "bshc,chd->bshd"} : (tensor<?x?x2x4xf32>, tensor<4x2x3xf32>) -> tensor<?x?x2x3xf32>
// The rest of the layer is unchanged.
// CHECK-NEXT: %o = dsv3.merge_heads %attn
// CHECK-NEXT: %out = dsv3.matmul %o, %lwo
// CHECK-NEXT: %next = dsv3.add %hin, %out
// CHECK-NEXT: dsv3.yield %next

// No per-head key or value is computed any more: the up-projection of c_kv and the naive attention are gone.
// GONE-NOT: dsv3.attention
// GONE-NOT: dsv3.matmul %c_kv
// GONE-NOT: %kv_heads
// GONE-NOT: %k_nope

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
