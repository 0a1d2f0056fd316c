// RUN: dsv3c opt %s -p 'dsv3-drop-mtp,dsv3-dce' --print-between-passes | filecheck %s

// `--print-between-passes` prints the module after each pass of the pipeline, under an mlir-opt style header.
// The MTP loss goes in the first pass (with the parameter that only fed it); the second finds nothing left to do.

// CHECK:       // -----// IR after dsv3-drop-mtp //----- //
// CHECK-NEXT:  builtin.module {
// CHECK-NEXT:    func.func @model(%tokens: tensor<?x?xi32>) {
// CHECK-NEXT:      %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64}
// CHECK-NEXT:      %table = dsv3.param {name = "embed"
// CHECK-NEXT:      %h = dsv3.embed %table, %ids
// CHECK-NEXT:      dsv3.output %h {name = "hidden", role = #dsv3<role hidden>}
// CHECK-NEXT:      func.return
// CHECK:       // -----// IR after dsv3-dce //----- //
// CHECK-NEXT:  builtin.module {
// CHECK-NEXT:    func.func @model(%tokens: tensor<?x?xi32>) {
// CHECK-NEXT:      %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64}
// CHECK-NEXT:      %table = dsv3.param {name = "embed"
// CHECK-NEXT:      %h = dsv3.embed %table, %ids
// CHECK-NEXT:      dsv3.output %h {name = "hidden", role = #dsv3<role hidden>}
// CHECK-NEXT:      func.return
// CHECK-NOT:   IR after

builtin.module {
  func.func @model(%tokens: tensor<?x?xi32>) {
    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %table = dsv3.param {name = "embed", axes = ["vocab", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<64x16xf32>
    %h = dsv3.embed %table, %ids : (tensor<64x16xf32>, tensor<?x?xi32>) -> tensor<?x?x16xf32>
    dsv3.output %h {name = "hidden", role = #dsv3<role hidden>} : tensor<?x?x16xf32>
    %mtp_w = dsv3.param {name = "mtp.0.norm", axes = ["embed"], init = "ones", trainable = true} : tensor<16xf32>
    %mtp_h = dsv3.rms_norm %h, %mtp_w {eps = 1.000000e-06 : f64} : (tensor<?x?x16xf32>, tensor<16xf32>) -> tensor<?x?x16xf32>
    %mtp_sum = dsv3.sum %mtp_h : (tensor<?x?x16xf32>) -> tensor<f32>
    dsv3.output %mtp_sum {name = "mtp_loss", role = #dsv3<role mtp_loss>, weight = 3.000000e-01 : f64} : tensor<f32>
    func.return
  }
}
