// RUN: dsv3c opt %s -p 'dsv3-pipeline{ranks=2 schedule=1f1b microbatches=4}' | filecheck %s
// RUN: dsv3c opt %s -p 'dsv3-pipeline{ranks=2 schedule=dualpipev microbatches=4}' | filecheck %s --check-prefix=V

// dsv3-pipeline cuts the layers, in order across the stacks, into the schedule's chunks, balancing forward FLOPs
// per token: a layer here is one 16x16 matmul (512 FLOPs), the head after the stacks a 16x64 one (2048 FLOPs), so
// the last chunk, which carries the head, takes fewer layers.

// 1F1B on 2 ranks: 2 chunks. 6 layers and the head (4 layers' worth): chunk 0 gets 5 layers (2,560 FLOPs), chunk 1
// one layer and the head (2,560).
// CHECK:       dsv3.pipeline {ranks = 2 : i64, schedule = #dsv3<pipeline_schedule "1f1b">, microbatches = 4 : i64, placement = [0 : i64, 1 : i64], cost = [2560 : i64, 2560 : i64]}
// CHECK:       dsv3.layer_stack %h, %w1 {count = 2 : i64, kind = "dense", chunks = [2 : i64, 0 : i64]}
// CHECK:       dsv3.layer_stack %h1, %w2 {count = 4 : i64, kind = "dense", chunks = [3 : i64, 1 : i64]}

// DualPipeV on 2 ranks: 4 chunks in a V (chunks 0 and 3 on rank 0). The head's chunk costs 2,560 FLOPs with its one
// layer, whatever the cut; the other five layers spread over three chunks under it.
// V:           dsv3.pipeline {ranks = 2 : i64, schedule = #dsv3<pipeline_schedule dualpipev>, microbatches = 4 : i64, placement = [0 : i64, 1 : i64, 1 : i64, 0 : i64], cost = [512 : i64, 1024 : i64, 1024 : i64, 2560 : i64]}
// V:           dsv3.layer_stack %h, %w1 {count = 2 : i64, kind = "dense", chunks = [1 : i64, 1 : i64, 0 : i64, 0 : i64]}
// V:           dsv3.layer_stack %h1, %w2 {count = 4 : i64, kind = "dense", chunks = [0 : i64, 1 : i64, 2 : i64, 1 : i64]}

builtin.module {
  func.func @model(%tokens: tensor<?x?xi32>) {
    %ids, %mask = dsv3.token_window %tokens {offset = 0 : i64} : (tensor<?x?xi32>) -> (tensor<?x?xi32>, tensor<?x?xf32>)
    %table = dsv3.param {name = "embed", axes = ["vocab", "embed"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<64x16xf32>
    %h = dsv3.embed %table, %ids : (tensor<64x16xf32>, tensor<?x?xi32>) -> tensor<?x?x16xf32>
    %w1 = dsv3.param {name = "a.proj", axes = ["layers", "embed", "mlp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<2x16x16xf32>
    %h1 = dsv3.layer_stack %h, %w1 {count = 2 : i64, kind = "dense"} : (tensor<?x?x16xf32>, tensor<2x16x16xf32>) -> tensor<?x?x16xf32> {
    ^bb0(%x: tensor<?x?x16xf32>, %w: tensor<16x16xf32>):
      %y = dsv3.matmul %x, %w : (tensor<?x?x16xf32>, tensor<16x16xf32>) -> tensor<?x?x16xf32>
      dsv3.yield %y : tensor<?x?x16xf32>
    }
    %w2 = dsv3.param {name = "b.proj", axes = ["layers", "embed", "mlp"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<4x16x16xf32>
    %h2 = dsv3.layer_stack %h1, %w2 {count = 4 : i64, kind = "dense"} : (tensor<?x?x16xf32>, tensor<4x16x16xf32>) -> tensor<?x?x16xf32> {
    ^bb1(%x2: tensor<?x?x16xf32>, %v: tensor<16x16xf32>):
      %y2 = dsv3.matmul %x2, %v : (tensor<?x?x16xf32>, tensor<16x16xf32>) -> tensor<?x?x16xf32>
      dsv3.yield %y2 : tensor<?x?x16xf32>
    }
    %head = dsv3.param {name = "head", axes = ["embed", "vocab"], init = "normal", std = 2.000000e-02 : f64, trainable = true} : tensor<16x64xf32>
    %logits = dsv3.matmul %h2, %head : (tensor<?x?x16xf32>, tensor<16x64xf32>) -> tensor<?x?x64xf32>
    dsv3.output %logits {name = "logits", role = #dsv3<role logits>} : tensor<?x?x64xf32>
    func.return
  }
}
