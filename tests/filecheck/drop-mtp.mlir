// RUN: dsv3c opt %s -p dsv3-drop-mtp | filecheck %s
// RUN: dsv3c opt %s -p dsv3-drop-mtp | filecheck %s --check-prefix=GONE

// dsv3-drop-mtp erases the MTP outputs and the MTP router-bias update (found by structure: what depends on what only
// the `mtp_loss` role's output needs, never by name), then dead-code elimination takes
// everything that only fed them: the MTP parameters, its token window, the second embedding lookup and the whole
// MTP layer stack. What the main model shares with MTP (the embedding table, the output head) stays, and so do the
// main model's outputs and its own bias update.

// CHECK-LABEL: func.func @model(%tokens: tensor<?x?xi32>) {
// CHECK-NEXT:    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64}
// The embedding table was shared with MTP: it stays.
// CHECK-NEXT:    %table = dsv3.param {name = "embed"
// CHECK-NEXT:    %h0 = dsv3.embed %table, %ids
// CHECK-NEXT:    %router = dsv3.param {name = "moe.router"
// CHECK-NEXT:    %bias = dsv3.param {name = "moe.router_bias"
// CHECK-NEXT:    %gate = dsv3.param {name = "moe.experts_gate"
// CHECK-NEXT:    %up = dsv3.param {name = "moe.experts_up"
// CHECK-NEXT:    %down = dsv3.param {name = "moe.experts_down"
// CHECK-NEXT:    %h, %aux, %load = dsv3.layer_stack %h0, %router, %bias, %gate, %up, %down {count = 2 : i64, kind = "moe"}
// CHECK:           dsv3.router
// CHECK:           dsv3.yield %next, %balance, %layer_load
// CHECK-NEXT:    }
// CHECK-NEXT:    %balance_total = dsv3.sum %aux
// CHECK-NEXT:    dsv3.output %balance_total {name = "balance_loss", role = #dsv3<role aux_loss>, weight = 1.000000e+00 : f64}
// CHECK-NEXT:    dsv3.output %load {name = "expert_load", role = #dsv3<role metric>}
// The main model's router bias keeps its update rule.
// CHECK-NEXT:    dsv3.bias_update %load {param = "moe.router_bias", rate = 1.000000e-02 : f64}
// The output head was shared with MTP: it stays.
// CHECK-NEXT:    %head = dsv3.param {name = "head"
// CHECK-NEXT:    %logits = dsv3.matmul %h, %head
// CHECK-NEXT:    dsv3.output %logits {name = "logits", role = #dsv3<role logits>}
// CHECK-NEXT:    %labels, %label_mask = dsv3.token_window %tokens {offset = 1 : i64}
// CHECK-NEXT:    %lm_loss = dsv3.cross_entropy %logits, %labels, %label_mask
// CHECK-NEXT:    dsv3.output %lm_loss {name = "lm_loss", role = #dsv3<role loss>, weight = 1.000000e+00 : f64}
// Nothing of MTP is left: the main model's last op is followed by the return.
// CHECK-NEXT:    func.return
// CHECK-NEXT:  }
// CHECK-NEXT: }

// Anywhere in the output: no MTP name, no offset-2 label window, no concatenation of embedding and hidden state.
// GONE-NOT: mtp
// GONE-NOT: offset = 2
// GONE-NOT: dsv3.concat

builtin.module {
  func.func @model(%tokens: tensor<?x?xi32>) {
    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %table = dsv3.param {name = "embed", axes = ["vocab", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<64x16xf32>
    %h0 = dsv3.embed %table, %ids : (tensor<64x16xf32>, tensor<?x?xi32>) -> tensor<?x?x16xf32>
    %router = dsv3.param {name = "moe.router", axes = ["layers", "embed", "exp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x16x4xf32>
    %bias = dsv3.param {name = "moe.router_bias", axes = ["layers", "exp"], init = "zeros", trainable = false} : tensor<2x4xf32>
    %gate = dsv3.param {name = "moe.experts_gate", axes = ["layers", "exp", "embed", "mlp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x4x16x8xf32>
    %up = dsv3.param {name = "moe.experts_up", axes = ["layers", "exp", "embed", "mlp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x4x16x8xf32>
    %down = dsv3.param {name = "moe.experts_down", axes = ["layers", "exp", "mlp", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x4x8x16xf32>
    %h, %aux, %load = dsv3.layer_stack %h0, %router, %bias, %gate, %up, %down {count = 2 : i64, kind = "moe"} : (tensor<?x?x16xf32>, tensor<2x16x4xf32>, tensor<2x4xf32>, tensor<2x4x16x8xf32>, tensor<2x4x16x8xf32>, tensor<2x4x8x16xf32>) -> (tensor<?x?x16xf32>, tensor<2xf32>, tensor<2x4xf32>) {
    ^bb0(%x: tensor<?x?x16xf32>, %rw: tensor<16x4xf32>, %rb: tensor<4xf32>, %wg: tensor<4x16x8xf32>, %wu: tensor<4x16x8xf32>, %wd: tensor<4x8x16xf32>):
      %weights, %experts, %scores = dsv3.router %x, %rw, %rb {score = #dsv3<score sigmoid>, top_k = 2 : i64, groups = 1 : i64, keep_groups = 1 : i64, scale = 1.000000e+00 : f64, normalize = true} : (tensor<?x?x16xf32>, tensor<16x4xf32>, tensor<4xf32>) -> (tensor<?x?x2xf32>, tensor<?x?x2xi32>, tensor<?x?x4xf32>)
      %routed = dsv3.experts %x, %weights, %experts, %wg, %wu, %wd : (tensor<?x?x16xf32>, tensor<?x?x2xf32>, tensor<?x?x2xi32>, tensor<4x16x8xf32>, tensor<4x16x8xf32>, tensor<4x8x16xf32>) -> tensor<?x?x16xf32>
      %balance = dsv3.balance_loss %scores, %experts {alpha = 1.000000e-04 : f64} : (tensor<?x?x4xf32>, tensor<?x?x2xi32>) -> tensor<f32>
      %layer_load = dsv3.expert_load %experts {experts = 4 : i64} : (tensor<?x?x2xi32>) -> tensor<4xf32>
      %next = dsv3.add %x, %routed : (tensor<?x?x16xf32>, tensor<?x?x16xf32>) -> tensor<?x?x16xf32>
      dsv3.yield %next, %balance, %layer_load : tensor<?x?x16xf32>, tensor<f32>, tensor<4xf32>
    }
    %balance_total = dsv3.sum %aux : (tensor<2xf32>) -> tensor<f32>
    dsv3.output %balance_total {name = "balance_loss", role = #dsv3<role aux_loss>, weight = 1.000000e+00 : f64} : tensor<f32>
    dsv3.output %load {name = "expert_load", role = #dsv3<role metric>} : tensor<2x4xf32>
    dsv3.bias_update %load {param = "moe.router_bias", rate = 1.000000e-02 : f64} : tensor<2x4xf32>
    %head = dsv3.param {name = "head", axes = ["embed", "vocab"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<16x64xf32>
    %logits = dsv3.matmul %h, %head : (tensor<?x?x16xf32>, tensor<16x64xf32>) -> tensor<?x?x64xf32>
    dsv3.output %logits {name = "logits", role = #dsv3<role logits>} : tensor<?x?x64xf32>
    %labels, %label_mask = dsv3.token_window %tokens {offset = 1 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %lm_loss = dsv3.cross_entropy %logits, %labels, %label_mask : (tensor<?x?x64xf32>, tensor<?x?xi32>, tensor<?x?xf32>) -> tensor<f32>
    dsv3.output %lm_loss {name = "lm_loss", role = #dsv3<role loss>, weight = 1.000000e+00 : f64} : tensor<f32>
    %mtp_norm = dsv3.param {name = "mtp.0.norm", axes = ["embed"], init = "ones", trainable = true} : tensor<16xf32>
    %mtp_proj = dsv3.param {name = "mtp.0.eh_proj", axes = ["mlp", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<32x16xf32>
    %mtp_ids, %mtp_mask = dsv3.token_window %tokens {offset = 1 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %mtp_emb = dsv3.embed %table, %mtp_ids : (tensor<64x16xf32>, tensor<?x?xi32>) -> tensor<?x?x16xf32>
    %mtp_cat = dsv3.concat %mtp_emb, %h : (tensor<?x?x16xf32>, tensor<?x?x16xf32>) -> tensor<?x?x32xf32>
    %mtp_h0 = dsv3.matmul %mtp_cat, %mtp_proj : (tensor<?x?x32xf32>, tensor<32x16xf32>) -> tensor<?x?x16xf32>
    %mtp_router = dsv3.param {name = "mtp.0.block.router", axes = ["layers", "embed", "exp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<1x16x4xf32>
    %mtp_bias = dsv3.param {name = "mtp.0.block.router_bias", axes = ["layers", "exp"], init = "zeros", trainable = false} : tensor<1x4xf32>
    %mtp_h, %mtp_load = dsv3.layer_stack %mtp_h0, %mtp_router, %mtp_bias {count = 1 : i64, kind = "moe"} : (tensor<?x?x16xf32>, tensor<1x16x4xf32>, tensor<1x4xf32>) -> (tensor<?x?x16xf32>, tensor<1x4xf32>) {
    ^bb1(%mx: tensor<?x?x16xf32>, %mrw: tensor<16x4xf32>, %mrb: tensor<4xf32>):
      %mw, %mi, %ms = dsv3.router %mx, %mrw, %mrb {score = #dsv3<score sigmoid>, top_k = 2 : i64, groups = 1 : i64, keep_groups = 1 : i64, scale = 1.000000e+00 : f64, normalize = true} : (tensor<?x?x16xf32>, tensor<16x4xf32>, tensor<4xf32>) -> (tensor<?x?x2xf32>, tensor<?x?x2xi32>, tensor<?x?x4xf32>)
      %mload = dsv3.expert_load %mi {experts = 4 : i64} : (tensor<?x?x2xi32>) -> tensor<4xf32>
      dsv3.yield %mx, %mload : tensor<?x?x16xf32>, tensor<4xf32>
    }
    %mtp_final = dsv3.rms_norm %mtp_h, %mtp_norm {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
    %mtp_logits = dsv3.matmul %mtp_final, %head : (tensor<?x?x16xf32>, tensor<16x64xf32>) -> tensor<?x?x64xf32>
    %mtp_labels, %mtp_label_mask = dsv3.token_window %tokens {offset = 2 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %mtp_loss = dsv3.cross_entropy %mtp_logits, %mtp_labels, %mtp_label_mask : (tensor<?x?x64xf32>, tensor<?x?xi32>, tensor<?x?xf32>) -> tensor<f32>
    dsv3.output %mtp_loss {name = "mtp_loss", role = #dsv3<role mtp_loss>, weight = 3.000000e-01 : f64} : tensor<f32>
    dsv3.output %mtp_load {name = "mtp_expert_load", role = #dsv3<role metric>} : tensor<1x4xf32>
    dsv3.bias_update %mtp_load {param = "mtp.0.block.router_bias", rate = 1.000000e-02 : f64} : tensor<1x4xf32>
    func.return
  }
}
