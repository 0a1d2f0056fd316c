// RUN: dsv3c opt %s -p dsv3-remat | filecheck %s
// RUN: dsv3c opt %s -p 'dsv3-remat{policy=full save=c_kv,k_pe}' | filecheck %s --check-prefix=FULL
// RUN: dsv3c opt %s -p 'dsv3-remat{policy=full save=c_kv,k_pe}' | filecheck %s --check-prefix=FULL-SAVES
// RUN: dsv3c opt %s -p 'dsv3-remat{policy=deepseek offload=attn,h}' | filecheck %s --check-prefix=OFFLOAD
// RUN: dsv3c opt %s -p 'dsv3-remat{policy=none}' | filecheck %s --check-prefix=NONE
// RUN: dsv3c opt %s -p 'dsv3-remat{policy=full},dsv3-remat{policy=deepseek}' | filecheck %s
// RUN: dsv3c opt %s -p 'dsv3-remat{policy=full},dsv3-remat{policy=deepseek keep=true}' | filecheck %s --check-prefix=FULL-KEPT

// dsv3-remat (DeepSeek-V3's policy by default) tags every activation of a layer with `dsv3.checkpoint`: its name
// and what the backward pass does with it. RMSNorm outputs are recomputed, and so are the MLA up-projections
// (the matmuls by `wq_b` and `wkv_b`, whose input axis is a latent) with the per-head queries, keys and values
// computed from them alone; the down-projections, the attention output, the FFN and the residual stream are saved.
// The layer stack records the policy; the lowering turns the tags into a `jax.checkpoint` policy.

// CHECK:      dsv3.layer_stack
// CHECK-SAME:   {count = 2 : i64, kind = "dense", remat = "deepseek"}
// CHECK:        %[[X:.*]] = dsv3.rms_norm %h_in, %attn_norm
// CHECK-NEXT:   %[[XT:.*]] = dsv3.checkpoint %[[X]] {name = "attn_norm", action = #dsv3<action recompute>}
// CHECK-NEXT:   %[[QA:.*]] = dsv3.matmul %[[XT]], %wq_a
// CHECK-NEXT:   %[[QAT:.*]] = dsv3.checkpoint %[[QA]] {name = "wq_a", action = #dsv3<action save>}
// CHECK-NEXT:   %[[CQ:.*]] = dsv3.rms_norm %[[QAT]], %q_norm
// CHECK-NEXT:   %[[CQT:.*]] = dsv3.checkpoint %[[CQ]] {name = "c_q", action = #dsv3<action recompute>}
// CHECK-NEXT:   %[[QB:.*]] = dsv3.matmul %[[CQT]], %wq_b
// CHECK-NEXT:   dsv3.checkpoint %[[QB]] {name = "wq_b", action = #dsv3<action recompute>}
// Reshapes are not tagged (free to recompute): the slices of the split heads read it directly.
// CHECK-NEXT:   dsv3.split_heads
// CHECK:        {name = "q_nope", action = #dsv3<action recompute>}
// CHECK:        {name = "slice", action = #dsv3<action recompute>}
// CHECK:        {name = "q_pe", action = #dsv3<action recompute>}
// CHECK:        {name = "kv", action = #dsv3<action save>}
// CHECK:        {name = "slice.2", action = #dsv3<action save>}
// CHECK:        {name = "c_kv", action = #dsv3<action recompute>}
// CHECK:        {name = "slice.3", action = #dsv3<action save>}
// CHECK:        {name = "k_pe", action = #dsv3<action save>}
// CHECK:        {name = "wkv_b", action = #dsv3<action recompute>}
// CHECK:        {name = "k_nope", action = #dsv3<action recompute>}
// CHECK:        {name = "v", action = #dsv3<action recompute>}
// The attention core reads the saved k_pe too: its output is saved.
// CHECK:        %[[O:.*]] = dsv3.attention
// CHECK-NEXT:   dsv3.checkpoint %[[O]] {name = "attn", action = #dsv3<action save>}
// CHECK-NEXT:   dsv3.merge_heads
// CHECK:        {name = "wo", action = #dsv3<action save>}
// CHECK:        {name = "h", action = #dsv3<action save>}
// CHECK:        {name = "ffn_norm", action = #dsv3<action recompute>}
// CHECK:        {name = "ffn_gate", action = #dsv3<action save>}
// CHECK:        {name = "ffn_up", action = #dsv3<action save>}
// CHECK:        {name = "swiglu", action = #dsv3<action save>}
// CHECK:        {name = "ffn_down", action = #dsv3<action save>}
// Names drop the printer's `_N` suffix (`%h_1` is `h`) and are unique within a layer: `%h_2` is `h.2`.
// CHECK:        %[[OUT:.*]] = dsv3.checkpoint %{{.*}} {name = "h.2", action = #dsv3<action save>}
// CHECK-NEXT:   dsv3.yield %[[OUT]]
// Outside layer stacks nothing is tagged.
// CHECK:      %[[F:.*]] = dsv3.rms_norm %h, %final_norm
// CHECK-NEXT: dsv3.matmul %[[F]], %head

// `full` recomputes the whole layer; `save` keeps the named values (here only the latent KV and the rotated key).
// FULL:       remat = "full"
// FULL:       {name = "attn_norm", action = #dsv3<action recompute>}
// FULL:       {name = "kv", action = #dsv3<action recompute>}
// FULL:       {name = "c_kv", action = #dsv3<action save>}
// FULL:       {name = "k_pe", action = #dsv3<action save>}
// FULL:       {name = "attn", action = #dsv3<action recompute>}
// FULL:       {name = "h.2", action = #dsv3<action recompute>}
// FULL-SAVES-COUNT-2: action = #dsv3<action save>
// FULL-SAVES-NOT:     action = #dsv3<action save>

// `offload` moves the named values to host memory instead of recomputing or keeping them on the device.
// OFFLOAD:    {name = "attn", action = #dsv3<action offload>}
// OFFLOAD:    {name = "h", action = #dsv3<action offload>}
// OFFLOAD:    {name = "h.2", action = #dsv3<action save>}

// `none` states that backward keeps everything: no tags.
// NONE:       remat = "none"
// NONE-NOT:   dsv3.checkpoint

// Running the pass again replaces the policy (the second RUN line gives the first one's output) unless `keep=true`,
// which honours a policy already in the IR (a hand-edited file compiled with the default train pipeline).
// FULL-KEPT:  remat = "full"
// FULL-KEPT-NOT: action = #dsv3<action save>

builtin.module {
  func.func @model(%tokens: tensor<?x?xi32>) {
    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %positions = dsv3.positions %ids : (tensor<?x?xi32>) -> tensor<?x?xi32>
    %embed = dsv3.param {name = "embed", axes = ["vocab", "embed"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<32x16xf32>
    %h0 = dsv3.embed %embed, %ids : (tensor<32x16xf32>, tensor<?x?xi32>) -> tensor<?x?x16xf32>
    %s_attn_norm = dsv3.param {name = "dense.attn_norm", axes = ["layers", "embed"], init = "ones", trainable = true} : tensor<2x16xf32>
    %s_wq_a = dsv3.param {name = "dense.wq_a", axes = ["layers", "embed", "q_lora"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<2x16x8xf32>
    %s_q_norm = dsv3.param {name = "dense.q_norm", axes = ["layers", "q_lora"], init = "ones", trainable = true} : tensor<2x8xf32>
    %s_wq_b = dsv3.param {name = "dense.wq_b", axes = ["layers", "q_lora", "q_heads"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<2x8x12xf32>
    %s_wkv_a = dsv3.param {name = "dense.wkv_a", axes = ["layers", "embed", "kv_lora"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<2x16x10xf32>
    %s_kv_norm = dsv3.param {name = "dense.kv_norm", axes = ["layers", "kv_lora"], init = "ones", trainable = true} : tensor<2x8xf32>
    %s_wkv_b = dsv3.param {name = "dense.wkv_b", axes = ["layers", "kv_lora", "kv_heads"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<2x8x16xf32>
    %s_wo = dsv3.param {name = "dense.wo", axes = ["layers", "heads", "embed"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<2x8x16xf32>
    %s_ffn_norm = dsv3.param {name = "dense.ffn_norm", axes = ["layers", "embed"], init = "ones", trainable = true} : tensor<2x16xf32>
    %s_ffn_gate = dsv3.param {name = "dense.ffn_gate", axes = ["layers", "embed", "mlp"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<2x16x32xf32>
    %s_ffn_up = dsv3.param {name = "dense.ffn_up", axes = ["layers", "embed", "mlp"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<2x16x32xf32>
    %s_ffn_down = dsv3.param {name = "dense.ffn_down", axes = ["layers", "mlp", "embed"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<2x32x16xf32>
    %h = dsv3.layer_stack %h0, %s_attn_norm, %s_wq_a, %s_q_norm, %s_wq_b, %s_wkv_a, %s_kv_norm, %s_wkv_b, %s_wo, %s_ffn_norm, %s_ffn_gate, %s_ffn_up, %s_ffn_down {count = 2 : i64, kind = "dense"} : (tensor<?x?x16xf32>, tensor<2x16xf32>, tensor<2x16x8xf32>, tensor<2x8xf32>, tensor<2x8x12xf32>, tensor<2x16x10xf32>, tensor<2x8xf32>, tensor<2x8x16xf32>, tensor<2x8x16xf32>, tensor<2x16xf32>, tensor<2x16x32xf32>, tensor<2x16x32xf32>, tensor<2x32x16xf32>) -> tensor<?x?x16xf32> {
    ^bb0(%h_in: tensor<?x?x16xf32>, %attn_norm: tensor<16xf32>, %wq_a: tensor<16x8xf32>, %q_norm: tensor<8xf32>, %wq_b: tensor<8x12xf32>, %wkv_a: tensor<16x10xf32>, %kv_norm: tensor<8xf32>, %wkv_b: tensor<8x16xf32>, %wo: tensor<8x16xf32>, %ffn_norm: tensor<16xf32>, %ffn_gate: tensor<16x32xf32>, %ffn_up: tensor<16x32xf32>, %ffn_down: tensor<32x16xf32>):
      %0 = dsv3.rms_norm %h_in, %attn_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
      %1 = dsv3.matmul %0, %wq_a : (tensor<?x?x16xf32>, tensor<16x8xf32>) -> tensor<?x?x8xf32>
      %c_q = dsv3.rms_norm %1, %q_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x8xf32>, tensor<8xf32>) -> tensor<?x?x8xf32>
      %2 = dsv3.matmul %c_q, %wq_b : (tensor<?x?x8xf32>, tensor<8x12xf32>) -> tensor<?x?x12xf32>
      %q = dsv3.split_heads %2 {heads = 2 : i64} : (tensor<?x?x12xf32>) -> tensor<?x?x2x6xf32>
      %q_nope = dsv3.slice %q {start = 0 : i64, size = 4 : i64} : (tensor<?x?x2x6xf32>) -> tensor<?x?x2x4xf32>
      %3 = dsv3.slice %q {start = 4 : i64, size = 2 : i64} : (tensor<?x?x2x6xf32>) -> tensor<?x?x2x2xf32>
      %q_pe = dsv3.rope %3, %positions {theta = 1.000000e+04 : f64, layout = #dsv3<rope_layout half>} : (tensor<?x?x2x2xf32>, tensor<?x?xi32>) -> tensor<?x?x2x2xf32>
      %kv = dsv3.matmul %0, %wkv_a : (tensor<?x?x16xf32>, tensor<16x10xf32>) -> tensor<?x?x10xf32>
      %4 = dsv3.slice %kv {start = 0 : i64, size = 8 : i64} : (tensor<?x?x10xf32>) -> tensor<?x?x8xf32>
      %c_kv = dsv3.rms_norm %4, %kv_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x8xf32>, tensor<8xf32>) -> tensor<?x?x8xf32>
      %5 = dsv3.slice %kv {start = 8 : i64, size = 2 : i64} : (tensor<?x?x10xf32>) -> tensor<?x?x2xf32>
      %k_pe = dsv3.rope %5, %positions {theta = 1.000000e+04 : f64, layout = #dsv3<rope_layout half>} : (tensor<?x?x2xf32>, tensor<?x?xi32>) -> tensor<?x?x2xf32>
      %6 = dsv3.matmul %c_kv, %wkv_b : (tensor<?x?x8xf32>, tensor<8x16xf32>) -> tensor<?x?x16xf32>
      %kv_up = dsv3.split_heads %6 {heads = 2 : i64} : (tensor<?x?x16xf32>) -> tensor<?x?x2x8xf32>
      %k_nope = dsv3.slice %kv_up {start = 0 : i64, size = 4 : i64} : (tensor<?x?x2x8xf32>) -> tensor<?x?x2x4xf32>
      %v = dsv3.slice %kv_up {start = 4 : i64, size = 4 : i64} : (tensor<?x?x2x8xf32>) -> tensor<?x?x2x4xf32>
      %attn = dsv3.attention %q_nope, %q_pe, %k_nope, %k_pe, %v {scale = 0.40824829046386302 : f64} : (tensor<?x?x2x4xf32>, tensor<?x?x2x2xf32>, tensor<?x?x2x4xf32>, tensor<?x?x2xf32>, tensor<?x?x2x4xf32>) -> tensor<?x?x2x4xf32>
      %7 = dsv3.merge_heads %attn : (tensor<?x?x2x4xf32>) -> tensor<?x?x8xf32>
      %8 = dsv3.matmul %7, %wo : (tensor<?x?x8xf32>, tensor<8x16xf32>) -> tensor<?x?x16xf32>
      %h_1 = dsv3.add %h_in, %8 : (tensor<?x?x16xf32>, tensor<?x?x16xf32>) -> tensor<?x?x16xf32>
      %9 = dsv3.rms_norm %h_1, %ffn_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
      %10 = dsv3.matmul %9, %ffn_gate : (tensor<?x?x16xf32>, tensor<16x32xf32>) -> tensor<?x?x32xf32>
      %11 = dsv3.matmul %9, %ffn_up : (tensor<?x?x16xf32>, tensor<16x32xf32>) -> tensor<?x?x32xf32>
      %12 = dsv3.swiglu %10, %11 : (tensor<?x?x32xf32>, tensor<?x?x32xf32>) -> tensor<?x?x32xf32>
      %13 = dsv3.matmul %12, %ffn_down : (tensor<?x?x32xf32>, tensor<32x16xf32>) -> tensor<?x?x16xf32>
      %h_2 = dsv3.add %h_1, %13 : (tensor<?x?x16xf32>, tensor<?x?x16xf32>) -> tensor<?x?x16xf32>
      dsv3.yield %h_2 : tensor<?x?x16xf32>
    }
    %final_norm = dsv3.param {name = "final_norm", axes = ["embed"], init = "ones", trainable = true} : tensor<16xf32>
    %head = dsv3.param {name = "head", axes = ["embed", "vocab"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<16x32xf32>
    %14 = dsv3.rms_norm %h, %final_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
    %logits = dsv3.matmul %14, %head : (tensor<?x?x16xf32>, tensor<16x32xf32>) -> tensor<?x?x32xf32>
    dsv3.output %logits {name = "logits", role = #dsv3<role logits>} : tensor<?x?x32xf32>
    %labels, %label_mask = dsv3.token_window %tokens {offset = 1 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %lm_loss = dsv3.cross_entropy %logits, %labels, %label_mask : (tensor<?x?x32xf32>, tensor<?x?xi32>, tensor<?x?xf32>) -> tensor<f32>
    dsv3.output %lm_loss {name = "lm_loss", role = #dsv3<role loss>, weight = 1.000000e+00 : f64} : tensor<f32>
    func.return
  }
}
