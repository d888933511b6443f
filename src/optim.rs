// placeholder until the optimiser lands (helper writes this file)
