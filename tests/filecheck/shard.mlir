// RUN: dsv3c opt %s -p 'dsv3-shard{mesh="fsdp=2,expert=2,tensor=2"}' | filecheck %s
// RUN: dsv3c opt %s -p 'dsv3-shard{mesh="fsdp=2,expert=2,tensor=2"},dsv3-overlap{chunks=4 platform=tpu}' | filecheck %s --check-prefix=OVERLAP
// RUN: dsv3c opt %s -p 'dsv3-shard{mesh="fsdp=2" mode=explicit}' | filecheck %s --check-prefix=EXPLICIT
// RUN: not dsv3c opt %s -p 'dsv3-shard{mesh="fsdp=3"}' 2>&1 | filecheck %s --check-prefix=INDIVISIBLE

// dsv3-shard maps logical axes to mesh axes by the rule table (sizes-1 axes ignored) and writes the mesh, a sharding
// on every parameter and constraints on the key activations. Non-expert weights use `expert` as extra FSDP; routed
// expert weights are split over `expert` (EP); heads, mlp and vocab over `tensor`.
// CHECK:      dsv3.mesh {axes = ["fsdp", "expert", "tensor"], shape = [2 : i64, 2 : i64, 2 : i64], mode = "auto"}
// CHECK:      %embed = dsv3.param {name = "embed", {{.*}} sharding = #dsv3.sharding<[{"tensor"}, {"fsdp", "expert"}]>}
// CHECK:      dsv3.shard {{.*}} {sharding = #dsv3.sharding<[{"fsdp", "expert"}, {}, {}]>} : (tensor<?x?x16xf32>)
// CHECK:      %moe_wq_b = dsv3.param {{.*}} sharding = #dsv3.sharding<[{}, {"fsdp", "expert"}, {"tensor"}]>}
// CHECK:      %moe_wo = dsv3.param {{.*}} sharding = #dsv3.sharding<[{}, {"tensor"}, {"fsdp", "expert"}]>}
// CHECK:      %moe_router_bias = dsv3.param {{.*}} sharding = #dsv3.sharding<[{}, {"expert"}]>}
// CHECK:      %moe_experts_gate = dsv3.param {{.*}} sharding = #dsv3.sharding<[{}, {"expert"}, {"fsdp"}, {"tensor"}]>}
// Attention heads are split over `tensor`, the batch over every batch-like axis.
// CHECK:      dsv3.shard %q {sharding = #dsv3.sharding<[{"fsdp", "expert"}, {}, {"tensor"}, {}]>}
// CHECK:      dsv3.shard %logits {sharding = #dsv3.sharding<[{"fsdp", "expert"}, {}, {"tensor"}]>}

// dsv3-overlap chunks the expert dispatch and declares the TPU options for asynchronous all-to-alls.
// OVERLAP:    dsv3.schedule {platform = "tpu", options = {xla_tpu_enable_latency_hiding_scheduler = true, xla_tpu_enable_async_all_to_all = true}}
// OVERLAP:    dsv3.experts {{.*}} {chunks = 4 : i64}

// Explicit mode states every layout change: each layer's weight slice is gathered (FSDP) where it is used.
// EXPLICIT:   dsv3.mesh {axes = ["fsdp"], shape = [2 : i64], mode = "explicit"}
// EXPLICIT:   ^bb0(
// EXPLICIT-NEXT: dsv3.shard %attn_norm {sharding = #dsv3.sharding<[{}]>}

// A mesh that does not divide a dimension is an error naming the parameter, before any compile.
// INDIVISIBLE: error: parameter 'embed': mesh axes fsdp=3 (3 ways) do not divide 'embed' of size 16
builtin.module {
  dsv3.optimizer {kind = "adamw", lr = 2.200000e-04 : f64, b1 = 9.000000e-01 : f64, b2 = 9.500000e-01 : f64, eps = 1.000000e-08 : f64, weight_decay = 1.000000e-01 : f64, clip = 1.000000e+00 : f64, moments = "f32", grads = "compute", schedule = "cosine", warmup = 0 : i64, decay_steps = 0 : i64, min_lr_ratio = 1.000000e-01 : f64}
  func.func @model(%tokens: tensor<?x?xi32>) {
    %ids, %0 = dsv3.token_window %tokens {offset = 0 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %positions = dsv3.positions %ids : (tensor<?x?xi32>) -> tensor<?x?xi32>
    %embed = dsv3.param {name = "embed", axes = ["vocab", "embed"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<32x16xf32>
    %1 = dsv3.embed %embed, %ids : (tensor<32x16xf32>, tensor<?x?xi32>) -> tensor<?x?x16xf32>
    %moe_attn_norm = dsv3.param {name = "moe.attn_norm", axes = ["layers", "embed"], init = "ones", trainable = true} : tensor<1x16xf32>
    %moe_wq_a = dsv3.param {name = "moe.wq_a", axes = ["layers", "embed", "q_lora"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<1x16x8xf32>
    %moe_q_norm = dsv3.param {name = "moe.q_norm", axes = ["layers", "q_lora"], init = "ones", trainable = true} : tensor<1x8xf32>
    %moe_wq_b = dsv3.param {name = "moe.wq_b", axes = ["layers", "q_lora", "q_heads"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<1x8x16xf32>
    %moe_wkv_a = dsv3.param {name = "moe.wkv_a", axes = ["layers", "embed", "kv_lora"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<1x16x12xf32>
    %moe_kv_norm = dsv3.param {name = "moe.kv_norm", axes = ["layers", "kv_lora"], init = "ones", trainable = true} : tensor<1x8xf32>
    %moe_wkv_b = dsv3.param {name = "moe.wkv_b", axes = ["layers", "kv_lora", "kv_heads"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<1x8x16xf32>
    %moe_wo = dsv3.param {name = "moe.wo", axes = ["layers", "heads", "embed"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<1x8x16xf32>
    %moe_ffn_norm = dsv3.param {name = "moe.ffn_norm", axes = ["layers", "embed"], init = "ones", trainable = true} : tensor<1x16xf32>
    %moe_router = dsv3.param {name = "moe.router", axes = ["layers", "embed", "exp"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<1x16x4xf32>
    %moe_router_bias = dsv3.param {name = "moe.router_bias", axes = ["layers", "exp"], init = "zeros", trainable = false} : tensor<1x4xf32>
    %moe_experts_gate = dsv3.param {name = "moe.experts_gate", axes = ["layers", "exp", "embed", "mlp"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<1x4x16x8xf32>
    %moe_experts_up = dsv3.param {name = "moe.experts_up", axes = ["layers", "exp", "embed", "mlp"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<1x4x16x8xf32>
    %moe_experts_down = dsv3.param {name = "moe.experts_down", axes = ["layers", "exp", "mlp", "embed"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<1x4x8x16xf32>
    %h, %balance, %load = dsv3.layer_stack %1, %moe_attn_norm, %moe_wq_a, %moe_q_norm, %moe_wq_b, %moe_wkv_a, %moe_kv_norm, %moe_wkv_b, %moe_wo, %moe_ffn_norm, %moe_router, %moe_router_bias, %moe_experts_gate, %moe_experts_up, %moe_experts_down {count = 1 : i64, kind = "moe"} : (tensor<?x?x16xf32>, tensor<1x16xf32>, tensor<1x16x8xf32>, tensor<1x8xf32>, tensor<1x8x16xf32>, tensor<1x16x12xf32>, tensor<1x8xf32>, tensor<1x8x16xf32>, tensor<1x8x16xf32>, tensor<1x16xf32>, tensor<1x16x4xf32>, tensor<1x4xf32>, tensor<1x4x16x8xf32>, tensor<1x4x16x8xf32>, tensor<1x4x8x16xf32>) -> (tensor<?x?x16xf32>, tensor<1xf32>, tensor<1x4xf32>) {
    ^bb0(%h_1: tensor<?x?x16xf32>, %attn_norm: tensor<16xf32>, %wq_a: tensor<16x8xf32>, %q_norm: tensor<8xf32>, %wq_b: tensor<8x16xf32>, %wkv_a: tensor<16x12xf32>, %kv_norm: tensor<8xf32>, %wkv_b: tensor<8x16xf32>, %wo: tensor<8x16xf32>, %ffn_norm: tensor<16xf32>, %router: tensor<16x4xf32>, %router_bias: tensor<4xf32>, %experts_gate: tensor<4x16x8xf32>, %experts_up: tensor<4x16x8xf32>, %experts_down: tensor<4x8x16xf32>):
      %2 = dsv3.rms_norm %h_1, %attn_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
      %3 = dsv3.matmul %2, %wq_a : (tensor<?x?x16xf32>, tensor<16x8xf32>) -> tensor<?x?x8xf32>
      %c_q = dsv3.rms_norm %3, %q_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x8xf32>, tensor<8xf32>) -> tensor<?x?x8xf32>
      %4 = dsv3.matmul %c_q, %wq_b : (tensor<?x?x8xf32>, tensor<8x16xf32>) -> tensor<?x?x16xf32>
      %q = dsv3.split_heads %4 {heads = 2 : i64} : (tensor<?x?x16xf32>) -> tensor<?x?x2x8xf32>
      %q_nope = dsv3.slice %q {start = 0 : i64, size = 4 : i64} : (tensor<?x?x2x8xf32>) -> tensor<?x?x2x4xf32>
      %5 = dsv3.slice %q {start = 4 : i64, size = 4 : i64} : (tensor<?x?x2x8xf32>) -> tensor<?x?x2x4xf32>
      %q_pe = dsv3.rope %5, %positions {theta = 1.000000e+04 : f64, layout = #dsv3<rope_layout half>} : (tensor<?x?x2x4xf32>, tensor<?x?xi32>) -> tensor<?x?x2x4xf32>
      %kv = dsv3.matmul %2, %wkv_a : (tensor<?x?x16xf32>, tensor<16x12xf32>) -> tensor<?x?x12xf32>
      %6 = dsv3.slice %kv {start = 0 : i64, size = 8 : i64} : (tensor<?x?x12xf32>) -> tensor<?x?x8xf32>
      %c_kv = dsv3.rms_norm %6, %kv_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x8xf32>, tensor<8xf32>) -> tensor<?x?x8xf32>
      %7 = dsv3.slice %kv {start = 8 : i64, size = 4 : i64} : (tensor<?x?x12xf32>) -> tensor<?x?x4xf32>
      %k_pe = dsv3.rope %7, %positions {theta = 1.000000e+04 : f64, layout = #dsv3<rope_layout half>} : (tensor<?x?x4xf32>, tensor<?x?xi32>) -> tensor<?x?x4xf32>
      %8 = dsv3.matmul %c_kv, %wkv_b : (tensor<?x?x8xf32>, tensor<8x16xf32>) -> tensor<?x?x16xf32>
      %9 = dsv3.split_heads %8 {heads = 2 : i64} : (tensor<?x?x16xf32>) -> tensor<?x?x2x8xf32>
      %k_nope = dsv3.slice %9 {start = 0 : i64, size = 4 : i64} : (tensor<?x?x2x8xf32>) -> tensor<?x?x2x4xf32>
      %v = dsv3.slice %9 {start = 4 : i64, size = 4 : i64} : (tensor<?x?x2x8xf32>) -> tensor<?x?x2x4xf32>
      %attn = dsv3.attention %q_nope, %q_pe, %k_nope, %k_pe, %v {scale = 0.35355339059327379 : f64} : (tensor<?x?x2x4xf32>, tensor<?x?x2x4xf32>, tensor<?x?x2x4xf32>, tensor<?x?x4xf32>, tensor<?x?x2x4xf32>) -> tensor<?x?x2x4xf32>
      %10 = dsv3.merge_heads %attn : (tensor<?x?x2x4xf32>) -> tensor<?x?x8xf32>
      %11 = dsv3.matmul %10, %wo : (tensor<?x?x8xf32>, tensor<8x16xf32>) -> tensor<?x?x16xf32>
      %h_2 = dsv3.add %h_1, %11 : (tensor<?x?x16xf32>, tensor<?x?x16xf32>) -> tensor<?x?x16xf32>
      %12 = dsv3.rms_norm %h_2, %ffn_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
      %gate_w, %experts, %scores = dsv3.router %12, %router, %router_bias {score = #dsv3<score sigmoid>, top_k = 2 : i64, groups = 1 : i64, keep_groups = 1 : i64, scale = 1.000000e+00 : f64, normalize = true} : (tensor<?x?x16xf32>, tensor<16x4xf32>, tensor<4xf32>) -> (tensor<?x?x2xf32>, tensor<?x?x2xi32>, tensor<?x?x4xf32>)
      %13 = dsv3.experts %12, %gate_w, %experts, %experts_gate, %experts_up, %experts_down : (tensor<?x?x16xf32>, tensor<?x?x2xf32>, tensor<?x?x2xi32>, tensor<4x16x8xf32>, tensor<4x16x8xf32>, tensor<4x8x16xf32>) -> tensor<?x?x16xf32>
      %14 = dsv3.balance_loss %scores, %experts {alpha = 0.000000e+00 : f64} : (tensor<?x?x4xf32>, tensor<?x?x2xi32>) -> tensor<f32>
      %15 = dsv3.expert_load %experts {experts = 4 : i64} : (tensor<?x?x2xi32>) -> tensor<4xf32>
      %h_3 = dsv3.add %h_2, %13 : (tensor<?x?x16xf32>, tensor<?x?x16xf32>) -> tensor<?x?x16xf32>
      dsv3.yield %h_3, %14, %15 : tensor<?x?x16xf32>, tensor<f32>, tensor<4xf32>
    }
    %16 = dsv3.sum %balance : (tensor<1xf32>) -> tensor<f32>
    dsv3.output %16 {name = "balance_loss", role = #dsv3<role aux_loss>, weight = 1.000000e+00 : f64} : tensor<f32>
    dsv3.output %load {name = "expert_load", role = #dsv3<role metric>} : tensor<1x4xf32>
    %final_norm = dsv3.param {name = "final_norm", axes = ["embed"], init = "ones", trainable = true} : tensor<16xf32>
    %head = dsv3.param {name = "head", axes = ["embed", "vocab"], init = "normal", std = 6.000000e-03 : f64, trainable = true} : tensor<16x32xf32>
    %17 = dsv3.rms_norm %h, %final_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
    %logits = dsv3.matmul %17, %head : (tensor<?x?x16xf32>, tensor<16x32xf32>) -> tensor<?x?x32xf32>
    dsv3.output %logits {name = "logits", role = #dsv3<role logits>} : tensor<?x?x32xf32>
    %18, %19 = dsv3.token_window %tokens {offset = 1 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %20 = dsv3.cross_entropy %logits, %18, %19 : (tensor<?x?x32xf32>, tensor<?x?xi32>, tensor<?x?xf32>) -> tensor<f32>
    dsv3.output %20 {name = "lm_loss", role = #dsv3<role loss>, weight = 1.000000e+00 : f64} : tensor<f32>
    func.return
  }
}
