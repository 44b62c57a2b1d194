/* The smallest complete use of fusedmoe from C: one f32 layer on the CPU.
 * Built and run by tests/header.rs; the README quotes it. */
#include "fusedmoe.h"
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                              \
    do {                                                                         \
        moe_status s_ = (call);                                                  \
        if (s_ != MOE_OK) {                                                      \
            fprintf(stderr, "%s: %s: %s\n", #call, moe_status_string(s_), moe_last_error()); \
            exit(1);                                                             \
        }                                                                        \
    } while (0)

static moe_tensor cpu_tensor(void *data, moe_dtype dtype, int32_t ndim, int64_t *shape) {
    moe_tensor t = {data, {MOE_DEVICE_CPU, 0}, ndim, dtype, shape, NULL, 0};
    return t;
}

int main(void) {
    enum { E = 4, K = 2, H = 8, I = 4, M = 3 };
    const moe_dtype f32 = {MOE_DTYPE_CODE_FLOAT, 32, 1}, i32 = {MOE_DTYPE_CODE_INT, 32, 1};
    static float w13[E][2 * I][H], w2[E][H][I], hidden[M][H], weights[M][K], out[M][H];
    static int32_t ids[M][K] = {{0, 3}, {1, -1}, {2, 0}}; /* -1: a dropped route */
    for (int e = 0; e < E; e++)
        for (int n = 0; n < 2 * I; n++)
            for (int h = 0; h < H; h++) w13[e][n][h] = 0.01f * (float)((e + n + h) % 7);
    for (int e = 0; e < E; e++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < I; i++) w2[e][h][i] = 0.02f * (float)((e * h + i) % 5);
    for (int m = 0; m < M; m++) {
        for (int h = 0; h < H; h++) hidden[m][h] = 1.0f + 0.1f * (float)(m + h);
        weights[m][0] = 0.75f;
        weights[m][1] = 0.25f;
    }

    /* setup, once per layer */
    moe_config *config;
    CHECK(moe_config_create(&config));
    CHECK(moe_config_set_num_experts(config, E));
    CHECK(moe_config_set_top_k(config, K));
    CHECK(moe_config_set_hidden_size(config, H));
    CHECK(moe_config_set_intermediate_size(config, I));
    CHECK(moe_config_set_dtype(config, f32));
    CHECK(moe_config_set_activation(config, MOE_ACTIVATION_SILU));
    int64_t w13_shape[] = {E, 2 * I, H}, w2_shape[] = {E, H, I};
    moe_tensor w13_t = cpu_tensor(w13, f32, 3, w13_shape), w2_t = cpu_tensor(w2, f32, 3, w2_shape);
    moe_layer *layer;
    CHECK(moe_layer_create(config, &w13_t, &w2_t, NULL, NULL, &layer));
    moe_config_free(config); /* the layer keeps its own copy */
    size_t bytes;
    CHECK(moe_workspace_size(layer, M, &bytes));
    void *workspace = aligned_alloc(64, (bytes + 63) / 64 * 64);
    moe_plan *plan;
    CHECK(moe_plan_create(layer, &plan));

    /* per batch */
    int64_t ids_shape[] = {M, K}, x_shape[] = {M, H}, ws_shape[] = {(int64_t)bytes};
    const moe_dtype u8 = {MOE_DTYPE_CODE_UINT, 8, 1};
    moe_tensor ids_t = cpu_tensor(ids, i32, 2, ids_shape), ws_t = cpu_tensor(workspace, u8, 1, ws_shape);
    moe_tensor x_t = cpu_tensor(hidden, f32, 2, x_shape), w_t = cpu_tensor(weights, f32, 2, ids_shape);
    moe_tensor out_t = cpu_tensor(out, f32, 2, x_shape);
    CHECK(moe_prepare(layer, &ids_t, &ws_t, plan, NULL));
    CHECK(moe_run(layer, NULL, plan, &x_t, &w_t, &out_t, NULL));
    for (int m = 0; m < M; m++) printf("out[%d][0..3] = %.5f %.5f %.5f\n", m, out[m][0], out[m][1], out[m][2]);

    moe_plan_free(plan);
    moe_layer_free(layer);
    free(workspace);
    puts("ok");
    return 0;
}
