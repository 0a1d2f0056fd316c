// RUN: dsv3c opt %s -p 'dsv3-fp8-quant{block=16}' | filecheck %s
// RUN: dsv3c opt %s -p 'dsv3-fp8-quant{block=16 per_tensor=true bwd=e5m2 pow2_scales=true}' | filecheck %s --check-prefix=TENSOR
// RUN: dsv3c opt %s -p 'dsv3-fp8-quant{block=16 weights_only=true}' | filecheck %s --check-prefix=STORED
// RUN: dsv3c opt %s -p 'dsv3-fp8-quant{block=16 weights_only=true},dsv3-fp8-quant{block=16}' | filecheck %s --check-prefix=W8A8

// dsv3-fp8-quant turns every Linear GEMM into DeepSeek-V3's fine-grained FP8 recipe: the activation is quantised
// per 1 x block tile, the weight per block x block tile (K = 40 is not a multiple of 16: its last tile is padded,
// so it has 3 scales), and an FP8 matmul multiplies them with FP32 accumulation; `grad_quant` says how its
// backward GEMMs quantise the gradient. The output head keeps its precision (its weight has the `vocab` axis),
// and the routed experts keep their op: its quantisation attributes say that its grouped GEMMs run in FP8 (and
// whatever else it carries, here its chunks, stays).

// CHECK-LABEL: func.func @model
// CHECK:         ^bb0(%x: tensor<?x?x16xbf16>, %up: tensor<16x40xf32>, %down: tensor<40x16xf32>):
// CHECK-NEXT:      %x_fp8, %x_scale = dsv3.quantize %x {quant = #dsv3.quant<f8E4M3FN, [1, 16], amax>} : (tensor<?x?x16xbf16>) -> (tensor<?x?x16xf8E4M3FN>, tensor<?x?x1xf32>)
// CHECK-NEXT:      %up_fp8, %up_scale = dsv3.quantize %up {quant = #dsv3.quant<f8E4M3FN, [16, 16], amax>} : (tensor<16x40xf32>) -> (tensor<16x40xf8E4M3FN>, tensor<1x3xf32>)
// CHECK-NEXT:      %u = dsv3.fp8_matmul %x_fp8, %x_scale, %up_fp8, %up_scale {x_quant = #dsv3.quant<f8E4M3FN, [1, 16], amax>, w_quant = #dsv3.quant<f8E4M3FN, [16, 16], amax>, grad_quant = #dsv3.quant<f8E4M3FN, [1, 16], amax>} : (tensor<?x?x16xf8E4M3FN>, tensor<?x?x1xf32>, tensor<16x40xf8E4M3FN>, tensor<1x3xf32>) -> tensor<?x?x40xbf16>
// CHECK-NEXT:      %u_fp8, %u_scale = dsv3.quantize %u {quant = #dsv3.quant<f8E4M3FN, [1, 16], amax>} : (tensor<?x?x40xbf16>) -> (tensor<?x?x40xf8E4M3FN>, tensor<?x?x3xf32>)
// CHECK-NEXT:      %down_fp8, %down_scale = dsv3.quantize %down {quant = #dsv3.quant<f8E4M3FN, [16, 16], amax>} : (tensor<40x16xf32>) -> (tensor<40x16xf8E4M3FN>, tensor<3x1xf32>)
// CHECK-NEXT:      %d = dsv3.fp8_matmul %u_fp8, %u_scale, %down_fp8, %down_scale
// CHECK-NEXT:      dsv3.yield %d
// CHECK:         %logits = dsv3.matmul %out, %head : (tensor<?x?x16xbf16>, tensor<16x64xf32>) -> tensor<?x?x64xf32>
// CHECK-LABEL: func.func @moe
// CHECK-NEXT:    %y = dsv3.experts %x, %gw, %ids, %g, %u, %d {chunks = 4 : i64, x_quant = #dsv3.quant<f8E4M3FN, [1, 16], amax>, w_quant = #dsv3.quant<f8E4M3FN, [16, 16], amax>, grad_quant = #dsv3.quant<f8E4M3FN, [1, 16], amax>}

// The common per-tensor recipe: one scale per tensor, here rounded to powers of two and E5M2 gradients.
// TENSOR:      %x_fp8, %x_scale = dsv3.quantize %x {quant = #dsv3.quant<f8E4M3FN, tensor, pow2>} : (tensor<?x?x16xbf16>) -> (tensor<?x?x16xf8E4M3FN>, tensor<1x1x1xf32>)
// TENSOR-NEXT: %up_fp8, %up_scale = dsv3.quantize %up {quant = #dsv3.quant<f8E4M3FN, tensor, pow2>} : (tensor<16x40xf32>) -> (tensor<16x40xf8E4M3FN>, tensor<1x1xf32>)
// TENSOR-NEXT: dsv3.fp8_matmul {{.*}} grad_quant = #dsv3.quant<f8E5M2, tensor, pow2>

// Weight-only FP8 for inference: each weight parameter is stored in FP8 with its block scales (as DeepSeek-V3's
// checkpoints store them), passed through the layer stack, and widened before an ordinary matmul.
// STORED:      %w_up = dsv3.param {name = "dense.up", axes = ["layers", "embed", "mlp"], init = "normal", std = 2.000000e-02 : f64, trainable = false} : tensor<2x16x40xf8E4M3FN>
// STORED-NEXT: %w_up_scale = dsv3.param {name = "dense.up.scale", axes = ["layers", "embed", "mlp"], init = "ones", trainable = false} : tensor<2x1x3xf32>
// STORED:      %out = dsv3.layer_stack %h, %w_up, %w_down, %w_up_scale, %w_down_scale
// STORED-NEXT: ^bb0(%x: tensor<?x?x16xbf16>, %up: tensor<16x40xf8E4M3FN>, %down: tensor<40x16xf8E4M3FN>, %up_scale: tensor<1x3xf32>, %down_scale: tensor<3x1xf32>):
// STORED-DAG:    %up_wide = dsv3.dequantize %up, %up_scale {quant = #dsv3.quant<f8E4M3FN, [16, 16], amax>} : (tensor<16x40xf8E4M3FN>, tensor<1x3xf32>) -> tensor<16x40xf32>
// STORED-DAG:    %down_wide = dsv3.dequantize %down, %down_scale
// STORED:        %u = dsv3.matmul %x, %up_wide
// STORED:      %head = dsv3.param {name = "head", {{.*}} : tensor<16x64xf32>

// ...and the full recipe over stored weights reads them directly: only the activations are quantised (W8A8).
// W8A8:        ^bb0(%x: tensor<?x?x16xbf16>, %up: tensor<16x40xf8E4M3FN>, %down: tensor<40x16xf8E4M3FN>, %up_scale: tensor<1x3xf32>, %down_scale: tensor<3x1xf32>):
// W8A8-NEXT:     %x_fp8, %x_scale = dsv3.quantize %x
// W8A8-NEXT:     %u = dsv3.fp8_matmul %x_fp8, %x_scale, %up, %up_scale
// W8A8-NOT:      dsv3.dequantize

builtin.module {
  dsv3.optimizer {kind = "adamw", lr = 1.000000e-02 : f64, b1 = 9.000000e-01 : f64, b2 = 9.500000e-01 : f64, eps = 1.000000e-08 : f64, weight_decay = 0.000000e+00 : f64, clip = 1.000000e+00 : f64, moments = "f32", grads = "compute", schedule = "cosine", warmup = 10 : i64, decay_steps = 0 : i64, min_lr_ratio = 1.000000e-01 : f64}
  func.func @model(%tokens: tensor<?x?xi32>) {
    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %table = dsv3.param {name = "embed", axes = ["vocab", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<64x16xf32>
    %h = dsv3.embed %table, %ids : (tensor<64x16xf32>, tensor<?x?xi32>) -> tensor<?x?x16xbf16>
    %w_up = dsv3.param {name = "dense.up", axes = ["layers", "embed", "mlp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x16x40xf32>
    %w_down = dsv3.param {name = "dense.down", axes = ["layers", "mlp", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x40x16xf32>
    %out = dsv3.layer_stack %h, %w_up, %w_down {count = 2 : i64, kind = "dense"} : (tensor<?x?x16xbf16>, tensor<2x16x40xf32>, tensor<2x40x16xf32>) -> tensor<?x?x16xbf16> {
    ^bb0(%x: tensor<?x?x16xbf16>, %up: tensor<16x40xf32>, %down: tensor<40x16xf32>):
      %u = dsv3.matmul %x, %up : (tensor<?x?x16xbf16>, tensor<16x40xf32>) -> tensor<?x?x40xbf16>
      %d = dsv3.matmul %u, %down : (tensor<?x?x40xbf16>, tensor<40x16xf32>) -> tensor<?x?x16xbf16>
      dsv3.yield %d : tensor<?x?x16xbf16>
    }
    %head = dsv3.param {name = "head", axes = ["embed", "vocab"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<16x64xf32>
    %logits = dsv3.matmul %out, %head : (tensor<?x?x16xbf16>, tensor<16x64xf32>) -> tensor<?x?x64xf32>
    dsv3.output %logits {name = "logits", role = #dsv3<role logits>} : tensor<?x?x64xf32>
    func.return
  }
  func.func @moe(%x: tensor<?x?x16xbf16>, %gw: tensor<?x?x2xf32>, %ids: tensor<?x?x2xi32>, %g: tensor<4x16x24xf32>, %u: tensor<4x16x24xf32>, %d: tensor<4x24x16xf32>) -> tensor<?x?x16xbf16> {
    %y = dsv3.experts %x, %gw, %ids, %g, %u, %d {chunks = 4 : i64} : (tensor<?x?x16xbf16>, tensor<?x?x2xf32>, tensor<?x?x2xi32>, tensor<4x16x24xf32>, tensor<4x16x24xf32>, tensor<4x24x16xf32>) -> tensor<?x?x16xbf16>
    func.return %y : tensor<?x?x16xbf16>
  }
}
