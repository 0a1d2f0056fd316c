// RUN: dsv3c opt %s -p dsv3-dce | filecheck %s
// RUN: dsv3c opt %s -p dsv3-dce | filecheck %s --check-prefix=GONE

// dsv3-dce erases pure ops whose results are unused: a dead matmul and then the parameter only it read, and a
// whole layer stack (with its stacked parameters) whose hidden state nobody reads. Ops without results (outputs,
// bias updates, the optimizer) and everything an output depends on stay.

// The optimizer has no results, so it is never dead.
// CHECK:       dsv3.optimizer {kind = "adamw"
// CHECK-LABEL: func.func @model(%tokens: tensor<?x?xi32>) {
// A multi-result op stays while any result is used (%mask is not).
// CHECK-NEXT:    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64}
// CHECK-NEXT:    %table = dsv3.param {name = "embed"
// CHECK-NEXT:    %h = dsv3.embed %table, %ids
// The unused parameter, the dead matmul and its weight, and the dead stack with its parameter are gone.
// CHECK-NEXT:    %live_norm = dsv3.param {name = "live_stack.norm"
// A stack whose hidden state is used stays whole, even with an unused per-layer output...
// CHECK-NEXT:    %live_out, %live_sum = dsv3.layer_stack %h, %live_norm {count = 2 : i64, kind = "dense"}
// CHECK-NEXT:    ^bb0(%x2: tensor<?x?x16xf32>, %w2: tensor<16xf32>):
// CHECK-NEXT:      %y2 = dsv3.rms_norm %x2, %w2
// ...but dead ops inside its body go.
// CHECK-NEXT:      %s = dsv3.sum %y2
// CHECK-NEXT:      dsv3.yield %y2, %s : tensor<?x?x16xf32>, tensor<f32>
// CHECK-NEXT:    }
// CHECK-NEXT:    dsv3.output %live_out {name = "hidden", role = #dsv3<role hidden>} : tensor<?x?x16xf32>
// CHECK-NEXT:    func.return

// GONE-NOT: "unused"
// GONE-NOT: dead
// GONE-NOT: dsv3.matmul
// GONE-NOT: dsv3.add

builtin.module {
  dsv3.optimizer {kind = "adamw", lr = 1.000000e-02 : f64, b1 = 9.000000e-01 : f64, b2 = 9.500000e-01 : f64, eps = 1.000000e-08 : f64, weight_decay = 0.000000e+00 : f64, clip = 1.000000e+00 : f64, moments = "f32", grads = "compute", schedule = "cosine", warmup = 10 : i64, decay_steps = 0 : i64, min_lr_ratio = 1.000000e-01 : f64}
  func.func @model(%tokens: tensor<?x?xi32>) {
    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %table = dsv3.param {name = "embed", axes = ["vocab", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<64x16xf32>
    %h = dsv3.embed %table, %ids : (tensor<64x16xf32>, tensor<?x?xi32>) -> tensor<?x?x16xf32>
    %unused = dsv3.param {name = "unused", axes = ["embed"], init = "ones", trainable = true} : tensor<16xf32>
    %w_dead = dsv3.param {name = "dead.proj", axes = ["embed", "mlp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<16x32xf32>
    %dead = dsv3.matmul %h, %w_dead : (tensor<?x?x16xf32>, tensor<16x32xf32>) -> tensor<?x?x32xf32>
    %dead_norm = dsv3.param {name = "dead_stack.norm", axes = ["layers", "embed"], init = "ones", trainable = true} : tensor<2x16xf32>
    %dead_out = dsv3.layer_stack %h, %dead_norm {count = 2 : i64, kind = "dense"} : (tensor<?x?x16xf32>, tensor<2x16xf32>) -> tensor<?x?x16xf32> {
    ^bb0(%x: tensor<?x?x16xf32>, %w: tensor<16xf32>):
      %y = dsv3.rms_norm %x, %w {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
      dsv3.yield %y : tensor<?x?x16xf32>
    }
    %live_norm = dsv3.param {name = "live_stack.norm", axes = ["layers", "embed"], init = "ones", trainable = true} : tensor<2x16xf32>
    %live_out, %live_sum = dsv3.layer_stack %h, %live_norm {count = 2 : i64, kind = "dense"} : (tensor<?x?x16xf32>, tensor<2x16xf32>) -> (tensor<?x?x16xf32>, tensor<2xf32>) {
    ^bb1(%x2: tensor<?x?x16xf32>, %w2: tensor<16xf32>):
      %y2 = dsv3.rms_norm %x2, %w2 {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
      %dead_in_body = dsv3.add %y2, %y2 : (tensor<?x?x16xf32>, tensor<?x?x16xf32>) -> tensor<?x?x16xf32>
      %s = dsv3.sum %y2 : (tensor<?x?x16xf32>) -> tensor<f32>
      dsv3.yield %y2, %s : tensor<?x?x16xf32>, tensor<f32>
    }
    dsv3.output %live_out {name = "hidden", role = #dsv3<role hidden>} : tensor<?x?x16xf32>
    func.return
  }
}
