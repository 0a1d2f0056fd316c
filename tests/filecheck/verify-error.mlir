// RUN: not dsv3c opt %s -p dsv3-dce 2>&1 | filecheck %s

// A hand edit that breaks an invariant is reported at the op that is wrong, as PATH:LINE:COL, before any pass runs:
// here top_k = 3 asks for more experts than the one kept group of two holds.

// CHECK: verify-error.mlir:[[# @LINE + 10]]:5: error: 'dsv3.router' op top_k = 3 exceeds the 2 kept experts
// CHECK-NOT: Traceback

builtin.module {
  func.func @model(%tokens: tensor<?x?xi32>) {
    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %table = dsv3.param {name = "embed", axes = ["vocab", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<64x16xf32>
    %h = dsv3.embed %table, %ids : (tensor<64x16xf32>, tensor<?x?xi32>) -> tensor<?x?x16xf32>
    %rw = dsv3.param {name = "router", axes = ["embed", "exp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<16x4xf32>
    %rb = dsv3.param {name = "router_bias", axes = ["exp"], init = "zeros", trainable = false} : tensor<4xf32>
    %weights, %experts, %scores = dsv3.router %h, %rw, %rb {score = #dsv3<score sigmoid>, top_k = 3 : i64, groups = 2 : i64, keep_groups = 1 : i64, scale = 1.000000e+00 : f64, normalize = true} : (tensor<?x?x16xf32>, tensor<16x4xf32>, tensor<4xf32>) -> (tensor<?x?x3xf32>, tensor<?x?x3xi32>, tensor<?x?x4xf32>)
    dsv3.output %weights {name = "weights", role = #dsv3<role metric>} : tensor<?x?x3xf32>
    func.return
  }
}
